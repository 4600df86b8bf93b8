"""The sidecar JSON each artifact carries: what the next step (build-engine, profile, eval) needs."""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from edgetok import __version__, atomic
from edgetok.atomic import write_text
from edgetok.errors import EdgetokError

SUFFIX = ".edgetok.json"


def sidecar_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.stem + SUFFIX)


def locked(artifact: str | Path):
    """Serialise read-modify-write of an artifact's sidecar and the publishing of a new export of it across
    processes: the artifact's lock (``atomic.locked``), which ``atomic.publish`` holds while it renames."""
    return atomic.locked(artifact)


def update(artifact: str | Path, change):
    """Read, change and write an artifact's sidecar as one step no other edgetok process can interleave with.
    ``change(data)`` edits ``data`` in place and returns None, or returns a reason to leave the file as it is."""
    with locked(artifact):
        data = read(artifact, verify=False)  # ``change`` decides about a sidecar of another file (eval's does)
        reason = change(data)
        if reason is None:
            write(sidecar_path(artifact), data)
        return reason


def request_mismatch(record_path: Path, want: dict, what: str) -> tuple[dict | None, str | None]:
    """A record (sidecar, build report) and why its ``request`` is not ``want``: (record, None) when it is,
    so the artifact it describes may be reused."""
    if not record_path.is_file():
        return None, f"it has no {what} {record_path.name}"
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, OSError):
        return None, f"its {what} {record_path.name} is unreadable"
    have = record.get("request") if isinstance(record, dict) else None
    if not isinstance(have, dict):
        return None, f"its {what} does not record what it was made from"
    differ = [k for k in want if have.get(k) != want[k]]
    if differ:
        return None, "; ".join(f"{k} was {have.get(k)!r}, now {want[k]!r}" for k in differ[:3])
    return record, None


def keep_accuracy(artifact: str | Path, data: dict) -> bool:
    """Copy into ``data`` (the sidecar a new export of ``artifact`` is about to publish) the ``accuracy`` an
    earlier `edgetok eval` recorded for the file it replaces, when the two ONNX files are byte-identical and
    preprocessed alike: the evaluation holds for the bytes, and re-exporting the same model must not forget it.
    Call under ``locked(artifact)``; returns whether it was kept."""
    path = sidecar_path(artifact)
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return False
    if not isinstance(old, dict) or not old.get("accuracy"):
        return False
    sha = (data.get("onnx") or {}).get("sha256")
    if not sha or (old.get("onnx") or {}).get("sha256") != sha or old.get("preprocessing") != data.get("preprocessing"):
        return False
    new_data, old_data = (data.get("onnx") or {}).get("data_sha256"), (old.get("onnx") or {}).get("data_sha256")
    if new_data or old_data:
        if new_data != old_data:
            return False  # the weights file beside the .onnx differs
    else:
        weights = (data.get("request") or {}).get("weights_sha256")
        if (data.get("onnx") or {}).get("external_data") and (not weights or (old.get("request") or {}).get("weights_sha256") != weights):
            return False  # a sidecar from before data_sha256: the hash covers only the .onnx, not its weights file
    data["accuracy"] = old["accuracy"]
    return True


def file_sha256(path: str | Path) -> str:
    """What an artifact's identity is checked by: the next step reuses a file only if this still matches."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_hashes(model: str | Path) -> dict:
    """The SHA-256 a sidecar records for a model (``onnx.sha256``) and, for a model whose weights live in an
    external data file beside it (``NAME.onnx.data``, as the exporter and ``onnx.save`` name it), that file's
    (``onnx.data_sha256``): the .onnx alone holds only the graph and a reference to the data, so its hash
    cannot tell one export's weights from another's."""
    model = Path(model)
    hashes = {"sha256": file_sha256(model)}
    if data_path(model).is_file():
        hashes["data_sha256"] = file_sha256(data_path(model))
    return hashes


def data_path(model: str | Path) -> Path:
    model = Path(model)
    return model.with_name(f"{model.name}.data")


def versions(*packages: str) -> dict:
    found = {"edgetok": __version__, "python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def stamp(data: dict) -> dict:
    return {"edgetok_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **data}


def write(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(strict(data), indent=2, allow_nan=False) + "\n")


def strict(value):
    """``value`` as strict JSON can hold it: JSON has no infinity or NaN (Python would write the non-standard
    tokens Infinity and NaN, which other readers refuse), so a non-finite number is written as the string
    "inf", "-inf" or "nan", which float() reads back (zerotprune's --head-variance 0,inf records [0.0, "inf"])."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def load(path: Path, remedy: str) -> dict:
    """A JSON artifact edgetok wrote; a damaged one is a one-line error saying how to remake it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise EdgetokError(f"{path} is not valid JSON ({exc}); {remedy}") from None


def read(artifact: str | Path, verify: bool = True) -> dict:
    """An artifact's sidecar, refused in one line when the model SHA-256 it records, or its external data
    file's (``model_hashes``), is not the file's: a publish interrupted between two renames, or files copied
    from two exports, must not lend one model's GMACs, accuracy or preprocessing to another."""
    path = sidecar_path(artifact)
    if not path.is_file():
        raise EdgetokError(f"{artifact} has no sidecar {path.name}; export it with `edgetok export`")
    data = load(path, "re-export the model")
    if verify and isinstance(data, dict) and Path(artifact).is_file():
        recorded = data.get("onnx") if isinstance(data.get("onnx"), dict) else {}
        # A sidecar from before data_sha256 was recorded checks the .onnx alone; a data file that is missing is
        # left to the runtime, which cannot load the model without it (no other model's numbers are reported).
        for key, file in (("sha256", Path(artifact)), ("data_sha256", data_path(artifact))):
            if not isinstance(recorded.get(key), str) or not file.is_file():
                continue
            actual = cached_sha256(file)
            if actual != recorded[key]:
                raise EdgetokError(f"{path} records the SHA-256 {recorded[key][:12]}... but {file} is {actual[:12]}...: "
                                   "the sidecar describes another model (an interrupted publish, or files of two "
                                   "exports); export the model again")
    return data


_SHA_CACHE: dict[tuple, str] = {}


def cached_sha256(path: Path) -> str:
    """file_sha256, once per file version: profile and eval read a model's sidecar several times."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]
