"""Keyed pseudonyms and the local secret."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

import pytest

from medmtl.ingest.pseudonym import SECRET_FILE_NAME, Pseudonymizer, SecretFileError, load_or_create_secret


def test_secret_is_created_once_with_mode_0600(tmp_path):
    key = load_or_create_secret(tmp_path)
    assert stat.S_IMODE((tmp_path / SECRET_FILE_NAME).stat().st_mode) == 0o600
    assert load_or_create_secret(tmp_path) == key and len(key) == 32


def test_group_readable_secret_is_refused_with_the_fix(tmp_path):
    load_or_create_secret(tmp_path)
    os.chmod(tmp_path / SECRET_FILE_NAME, 0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        load_or_create_secret(tmp_path)


def test_pseudonyms_are_keyed_hmacs_and_the_key_never_shows(tmp_path):
    key = load_or_create_secret(tmp_path)
    pz = Pseudonymizer(key)
    expected = "case-" + hmac.new(key, b"MRN-1", hashlib.sha256).hexdigest()[:12]
    assert pz.case_id("MRN-1") == expected
    assert pz.case_id("MRN-1") != Pseudonymizer(os.urandom(32)).case_id("MRN-1")
    assert pz.series_key("1.2.3").startswith("series-") and len(pz.series_key("1.2.3")) == 19
    assert key.hex() not in repr(pz) and key.hex() not in str(vars(pz).keys())


def test_uid_like_path_parts_are_replaced(tmp_path):
    pz = Pseudonymizer(os.urandom(32))
    rel = pz.safe_relpath(tmp_path / "DICOM" / "1.2.840.10008.99.12345.6" / "IM0001", tmp_path)
    assert rel.startswith("DICOM/uid-") and rel.endswith("/IM0001") and "1.2.840" not in rel
