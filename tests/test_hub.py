"""Catalog, `pull`, `list`, `--pair` and owner/repo:file names, against a stand-in hub on
127.0.0.1 (HF_ENDPOINT) running huggingface_hub's real download code. No test reaches
the internet."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fake_hub import FakeHub, point_hub_clients_at

from dera_local.cli import cli
from dera_local.errors import DeraError
from dera_local.sources import hub
from dera_local.sources.catalog import RemoteFile, find_pair

ALIGNED = RemoteFile("tiny/aligned-GGUF", "aligned.Q4_K_M.gguf")
REFERENCE = RemoteFile("tiny/reference-GGUF", "reference.Q4_K_M.gguf")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, aligned_path, reference_path):
    server = FakeHub()
    server.files[(ALIGNED.repo, ALIGNED.filename)] = aligned_path.read_bytes()
    server.files[(REFERENCE.repo, REFERENCE.filename)] = reference_path.read_bytes()
    catalog = {
        "pairs": {
            "tiny-pair": {
                "description": "two tiny test models",
                "exact": True,
                "beta": 0.1,
                "license": "mit",
                "aligned": {"repo": ALIGNED.repo, "file": "aligned.{quant}.gguf"},
                "reference": {"repo": REFERENCE.repo, "file": "reference.{quant}.gguf"},
                "quants": {
                    "Q4_K_M": {"approx_gb": {"aligned": 0.001, "reference": 0.001}},
                    "Q8_0": {},
                },
                "loss": "dpo",
                "checked": {"names": True, "source": "the test"},
            }
        }
    }
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    monkeypatch.setenv("DERA_CATALOG", str(tmp_path / "catalog.json"))
    point_hub_clients_at(server, monkeypatch, tmp_path / "hf")
    yield server
    server.stop()


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_pull_then_use_the_pair_from_the_cache_offline(fake_hub, pair, monkeypatch, greedy):
    assert "not downloaded" in run("list").stdout
    pulled = run("pull", "tiny-pair")
    assert pulled.exit_code == 0, pulled.stderr
    assert "Q4_K_M: ~0.001 + 0.001 GB, downloaded" in run("list").stdout
    fake_hub.stop()  # from now on the hub is gone
    again = run("pull", "tiny-pair")
    assert again.exit_code == 0, again.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run(
        "generate",
        "Hello",
        "--pair",
        "tiny-pair",
        "--json",
        "--temp",
        "0",
        "-n",
        "8",
        "--lam",
        "0.5",
    )
    assert result.exit_code == 0, result.stderr
    expected = pair.generate("Hello", lam=0.5, sampling=greedy, max_tokens=8)
    assert json.loads(result.stdout)["tokens"] == expected.tokens
    info = run("info", "--pair", "tiny-pair")
    assert info.exit_code == 0 and "compatibility: OK" in info.stdout
    says = "catalog pair tiny-pair: exact; beta 0.1 (DeRa at lam approximates beta/lam"
    assert says in info.stdout


def test_cut_connection_resumes_with_a_range_request(fake_hub):
    # huggingface_hub writes in 10 MB chunks: a cut after 12 MB leaves 10 MB to resume from
    big = RemoteFile("tiny/big", "big.gguf")
    data = bytes(range(256)) * (24 * 4096)
    fake_hub.files[(big.repo, big.filename)] = data
    fake_hub.cut_next_get.add((big.repo, big.filename))
    path = hub.download(big)
    assert fake_hub.range_requests == ["bytes=10485760-"], "the retry must resume, not restart"
    assert path.read_bytes() == data


def test_corrupted_body_is_caught_and_removed(fake_hub):
    fake_hub.corrupt.add((REFERENCE.repo, REFERENCE.filename))
    result = run("pull", "tiny-pair")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "checksum mismatch" in lines[0]
    assert hub.cached_path(REFERENCE) is None  # nothing left that would load later
    fake_hub.corrupt.clear()
    assert run("pull", "tiny-pair").exit_code == 0


def test_missing_file_is_a_404_line(fake_hub):
    result = run("pull", "tiny-pair", "--quant", "Q8_0")
    assert result.exit_code == 1 and "(404)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_offline_and_not_cached(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("pull", "tiny-pair")
    assert result.exit_code == 1 and "HF_HUB_OFFLINE is set" in result.stderr
    not_pulled = run("generate", "hi", "--pair", "tiny-pair")
    assert not_pulled.exit_code == 1 and "dera-local pull tiny-pair" in not_pulled.stderr


def test_unknown_pair_and_quant(fake_hub):
    result = run("pull", "tiny-pear")
    assert result.exit_code == 1 and "did you mean 'tiny-pair'?" in result.stderr
    with pytest.raises(DeraError, match="no quantization 'Q2_K'"):
        find_pair("tiny-pair").files("Q2_K")


def test_repo_colon_file_names_for_models(fake_hub, pair, greedy):
    result = run(
        "generate",
        "Hello",
        "-m",
        f"{ALIGNED.repo}:{ALIGNED.filename}",
        "-mr",
        f"{REFERENCE.repo}:{REFERENCE.filename}",
        "--json",
        "--temp",
        "0",
        "-n",
        "6",
        "--lam",
        "0.5",
    )
    assert result.exit_code == 0, result.stderr
    expected = pair.generate("Hello", lam=0.5, sampling=greedy, max_tokens=6)
    assert json.loads(result.stdout)["tokens"] == expected.tokens
    # info resolves the same specs (from the hub cache) instead of treating them as paths
    specs = [f"{ALIGNED.repo}:{ALIGNED.filename}", f"{REFERENCE.repo}:{REFERENCE.filename}"]
    info = run("info", "-m", specs[0], "-mr", specs[1])
    assert info.exit_code == 0, info.stderr
    assert "compatibility: OK, one tokenizer" in info.stdout
    aligned_line = next(line for line in info.stdout.splitlines() if line.startswith("aligned: "))
    assert aligned_line.endswith(ALIGNED.filename) and specs[0] not in aligned_line
    missing = run(
        "generate",
        "Hello",
        "-m",
        "tiny/nothing-GGUF:none.gguf",
        "-mr",
        f"{REFERENCE.repo}:{REFERENCE.filename}",
    )
    assert missing.exit_code == 1 and "404" in missing.stderr


def test_bundled_catalog_has_the_required_pairs():
    from dera_local.sources.catalog import load_catalog

    catalog = load_catalog()
    for name in ("zephyr-7b", "tulu-2-7b", "tulu-3-8b", "olmo-2-7b"):
        assert catalog[name].exact
    assert any(not entry.exact for entry in catalog.values())
    for entry in catalog.values():
        aligned, reference = entry.files()
        assert aligned.filename.endswith(".gguf") and "/" in reference.repo


def test_disk_full_is_one_line(fake_hub, monkeypatch):
    import errno

    import huggingface_hub

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_space)
    result = run("pull", "tiny-pair")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the disk is full" in lines[0]
