"""Where `pull` gets each side of a catalog pair: a pinned revision, fallback repositories
when the primary is gone, and the integrity checks (the catalog's sha256, or the sha256
the hub publishes, also in the X-Linked-Etag form Xet-stored files use), all against the
stand-in hub on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fake_hub import FakeHub, point_hub_clients_at

from dera_local.cli import cli
from dera_local.errors import DeraError
from dera_local.sources import hub
from dera_local.sources.catalog import find_pair, load_catalog
from dera_local.sources.resolve import pulled_pair

PINNED = "89abcdef0123456789abcdef0123456789abcdef"


def _side(repo: str, **extra) -> dict:
    return {"repo": repo, "file": "model.{quant}.gguf", **extra}


@pytest.fixture
def hub_with(tmp_path, monkeypatch, aligned_path, reference_path):
    """A stand-in hub and a one-pair catalog whose sides the test describes."""
    server = FakeHub()
    point_hub_clients_at(server, monkeypatch, tmp_path / "hf")

    def catalog(aligned: dict, reference: dict, sha256: dict | None = None) -> FakeHub:
        entry = {
            "description": "two tiny test models",
            "exact": True,
            "beta": 0.1,
            "loss": "dpo",
            "license": "mit",
            "checked": {"names": True},
            "aligned": aligned,
            "reference": reference,
            "quants": {"Q4_K_M": {"sha256": sha256 or {}}},
        }
        path = tmp_path / "catalog.json"
        path.write_text(json.dumps({"pairs": {"tiny": entry}}))
        monkeypatch.setenv("DERA_CATALOG", str(path))
        return server

    server.aligned_bytes = aligned_path.read_bytes()
    server.reference_bytes = reference_path.read_bytes()
    yield catalog
    server.stop()


def _pull(*args: str):
    return CliRunner().invoke(cli, ["pull", "tiny", *args])


def test_a_pinned_revision_is_requested_and_used(hub_with):
    server = hub_with(_side("t/aligned"), _side("t/reference", revision=PINNED))
    server.files[("t/aligned", "model.Q4_K_M.gguf")] = server.aligned_bytes
    # main holds other bytes than the pinned revision: only the pin gives the right model
    server.files[("t/reference", "model.Q4_K_M.gguf")] = b"GGUF not this one"
    server.at_revision[("t/reference", PINNED, "model.Q4_K_M.gguf")] = server.reference_bytes
    result = _pull()
    assert result.exit_code == 0, result.stderr
    assert PINNED in server.revisions and "main" in server.revisions
    _, reference = pulled_pair("tiny")
    assert PINNED in reference
    with open(reference, "rb") as handle:
        assert handle.read() == server.reference_bytes
    assert "t/reference@" + PINNED in CliRunner().invoke(cli, ["list"]).stdout


def test_a_gone_primary_falls_back_with_the_same_checks(hub_with, aligned_path):
    fallback = {"repo": "t/mirror", "file": "mirror-{quant}.gguf"}
    server = hub_with(_side("t/aligned", fallbacks=[fallback]), _side("t/reference"))
    server.files[("t/mirror", "mirror-Q4_K_M.gguf")] = server.aligned_bytes
    server.files[("t/reference", "model.Q4_K_M.gguf")] = server.reference_bytes
    result = _pull()
    assert result.exit_code == 0, result.stderr
    assert "aligned: using the fallback t/mirror:mirror-Q4_K_M.gguf" in result.stderr
    assert "(404)" in result.stderr
    aligned, _ = pulled_pair("tiny")
    assert aligned.endswith("mirror-Q4_K_M.gguf")
    # the fallback is checked like the primary: a corrupted body is caught and removed
    hub._remove_from_cache(hub.cached_path(find_pair("tiny").candidates()[0][1]))
    server.corrupt.add(("t/mirror", "mirror-Q4_K_M.gguf"))
    failed = _pull()
    assert failed.exit_code == 1 and "checksum mismatch" in failed.stderr
    with pytest.raises(DeraError, match="not downloaded"):
        pulled_pair("tiny")


def test_every_repository_gone_is_one_line(hub_with):
    hub_with(_side("t/aligned", fallbacks=[{"repo": "t/gone", "file": "x.gguf"}]), _side("t/r"))
    result = _pull()
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no repository of the aligned model" in lines[0]
    assert "t/aligned" in lines[0] and "t/gone" in lines[0]


def test_a_catalog_sha256_that_does_not_match_is_caught(hub_with):
    wrong = "0" * 64
    server = hub_with(_side("t/aligned"), _side("t/reference"), sha256={"reference": wrong})
    server.files[("t/aligned", "model.Q4_K_M.gguf")] = server.aligned_bytes
    server.files[("t/reference", "model.Q4_K_M.gguf")] = server.reference_bytes
    result = _pull()
    assert result.exit_code == 1 and "checksum mismatch (sha256 differs from 000000000000" in (
        result.stderr
    )
    reference = find_pair("tiny").files()[1]
    assert hub.cached_path(reference) is None  # removed: it can never load later


@pytest.mark.parametrize("corrupt", [False, True])
def test_xet_style_sha256_in_x_linked_etag(hub_with, corrupt):
    server = hub_with(_side("t/aligned"), _side("t/reference"))
    for repo, data in (
        ("t/aligned", server.aligned_bytes),
        ("t/reference", server.reference_bytes),
    ):
        server.files[(repo, "model.Q4_K_M.gguf")] = data
        server.xet.add((repo, "model.Q4_K_M.gguf"))
    if corrupt:
        server.corrupt.add(("t/reference", "model.Q4_K_M.gguf"))
    result = _pull()
    if corrupt:
        assert result.exit_code == 1 and "checksum mismatch" in result.stderr
    else:
        assert result.exit_code == 0, result.stderr


def test_bundled_catalog_records_what_was_checked():
    catalog = load_catalog()
    zephyr = catalog["zephyr-7b"]
    assert zephyr.files()[0].sha256 == (
        "503580dce392c6e64669ad21a77023ba2a17baa0c381250fb67c11ba6406a85e"
    )
    assert zephyr.candidates()[1][1].repo == "mav23/mistral-7b-sft-beta-GGUF"
    assert "mit (mistral-7b-sft-beta)" in zephyr.license
    for name in ("tulu-3-8b", "olmo-2-7b"):
        entry = catalog[name]
        assert entry.beta == 5 and entry.length_normalized
        assert "only a rough scale" in entry.strength_note()
    tulu3_aligned = catalog["tulu-3-8b"].candidates()[0]
    assert tulu3_aligned[1].filename == "Llama-3.1-Tulu-3-8B-DPO-Q4_K_M.gguf"
    assert tulu3_aligned[1].sha256.startswith("6ca51a88")
    for entry in catalog.values():
        assert entry.checked and "source" in entry.checked
        assert "verified" not in entry.entry
    listing = CliRunner().invoke(cli, ["list"]).stdout
    assert "length-normalized DPO" in listing and "checked: names True" in listing


def test_a_malformed_catalog_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"pairs": {"x": {"description": "no files"}}}))
    monkeypatch.setenv("DERA_CATALOG", str(path))
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "is malformed" in result.stderr
