"""The TLS settings are checked at start-up: each problem is a configuration
error that names its variable."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from services.common import tls
from services.common.config import ConfigError, EnvReader
from services.ingest import settings as ingest_settings


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    other = trustme.CA().issue_cert("localhost")
    paths = {
        "ca": tmp_path / "ca.crt",
        "cert": tmp_path / "tls.crt",
        "key": tmp_path / "tls.key",
        "other_key": tmp_path / "other.key",
        "garbage": tmp_path / "garbage.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["garbage"].write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    return {name: str(path) for name, path in paths.items()}


def errors_of(env: dict[str, str]) -> str:
    reader = EnvReader(env)
    tls.read(reader)
    with pytest.raises(ConfigError) as caught:
        reader.check()
    return str(caught.value)


def test_nothing_set_is_plaintext() -> None:
    reader = EnvReader({})
    settings = tls.read(reader)
    reader.check()
    assert settings == tls.TlsSettings()
    assert tls.server_credentials(settings) is None
    assert tls.channel_credentials(settings) is None
    assert tls.nats_context(settings, "nats://127.0.0.1:4222") is None


def test_a_certificate_without_its_key_names_the_missing_variable(files: dict[str, str]) -> None:
    message = errors_of({tls.CERT: files["cert"]})
    assert f"{tls.KEY}: required when {tls.CERT} is set" in message
    message = errors_of({tls.KEY: files["key"]})
    assert f"{tls.CERT}: required when {tls.KEY} is set" in message
    message = errors_of({tls.NATS_CERT: files["cert"]})
    assert f"{tls.NATS_KEY}: required when {tls.NATS_CERT} is set" in message


def test_an_unreadable_file_names_its_variable(files: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.crt")
    message = errors_of({tls.CERT: missing, tls.KEY: files["key"]})
    assert f"{tls.CERT}: cannot read {missing}" in message
    message = errors_of({tls.CA: missing})
    assert f"{tls.CA}: cannot read {missing}" in message
    message = errors_of({tls.NATS_CA: str(tmp_path)})  # a folder, not a file
    assert f"{tls.NATS_CA}: cannot read" in message


def test_unparseable_or_mismatched_files_are_errors(files: dict[str, str]) -> None:
    message = errors_of({tls.CERT: files["garbage"], tls.KEY: files["key"]})
    assert f"{tls.CERT}, {tls.KEY}: not a PEM certificate" in message
    # A key that is not the certificate's.
    message = errors_of({tls.CERT: files["cert"], tls.KEY: files["other_key"]})
    assert f"{tls.CERT}, {tls.KEY}: not a PEM certificate" in message
    message = errors_of(
        {tls.CLIENT_CA: files["garbage"], tls.CERT: files["cert"], tls.KEY: files["key"]}
    )
    assert f"{tls.CLIENT_CA}: {files['garbage']} holds no PEM CA certificate" in message


def test_a_client_ca_needs_a_server_certificate(files: dict[str, str]) -> None:
    message = errors_of({tls.CLIENT_CA: files["ca"]})
    assert f"{tls.CLIENT_CA}: requires {tls.CERT} and {tls.KEY}" in message


def test_the_service_settings_report_tls_errors_with_the_others(files: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        ingest_settings.load({tls.CERT: files["cert"]})
    message = str(caught.value)
    assert f"{tls.KEY}: required when {tls.CERT} is set" in message
    assert "DATABASE_URL: required" in message


def test_a_full_configuration_builds_credentials(files: dict[str, str]) -> None:
    reader = EnvReader(
        {
            tls.CERT: files["cert"],
            tls.KEY: files["key"],
            tls.CLIENT_CA: files["ca"],
            tls.CA: files["ca"],
            tls.NATS_CA: files["ca"],
            tls.NATS_CERT: files["cert"],
            tls.NATS_KEY: files["key"],
        }
    )
    settings = tls.read(reader)
    reader.check()
    assert settings.server_enabled
    assert settings.client_ca == Path(files["ca"])
    assert tls.server_credentials(settings) is not None
    assert tls.channel_credentials(settings) is not None
    context = tls.nats_context(settings, "tls://127.0.0.1:4222")
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_a_tls_nats_url_trusts_the_nats_ca_or_the_system(files: dict[str, str]) -> None:
    assert tls.nats_requires_tls("nats://a:4222, tls://b:4222")
    assert not tls.nats_requires_tls("nats://a:4222")
    ours = ssl.PEM_cert_to_DER_cert(Path(files["ca"]).read_text())
    system = tls.nats_context(tls.TlsSettings(), "tls://nats.example:4222")
    assert system is not None
    assert system.verify_mode is ssl.CERT_REQUIRED
    assert ours not in system.get_ca_certs(binary_form=True)
    given = tls.nats_context(tls.TlsSettings(nats_ca=Path(files["ca"])), "tls://nats:4222")
    assert given is not None
    assert ours in given.get_ca_certs(binary_form=True)
