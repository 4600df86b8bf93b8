"""How edgetok reads Hugging Face folders: local files only, and never a model's own code.

Every ``from_pretrained`` in edgetok takes ``LOCAL`` (no hub, ``trust_remote_code=False``), so a folder
whose ``auto_map`` points at its own Python files is refused by transformers at once (no y/N prompt on
a terminal) and ``load_error`` turns that into our one-line error; a folder of a model type that
transformers implements itself loads that implementation, whatever its ``auto_map`` says.
"""

from __future__ import annotations

from edgetok.errors import EdgetokError

LOCAL = {"local_files_only": True, "trust_remote_code": False}


def load_error(folder, what: str, exc: Exception) -> EdgetokError:
    """One line for a failed load; code the folder ships is named as the reason."""
    text = " ".join(str(exc).split())
    if "custom code" in text or "trust_remote_code" in text:
        return EdgetokError(
            f"{folder} ships its own model code (auto_map) and edgetok never runs a model's own code; "
            "use a folder whose model_type transformers implements"
        )
    return EdgetokError(f"cannot load {what} in {folder}: {text[:160]}")
