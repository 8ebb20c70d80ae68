"""Cold vs warm load time of the embedded SmolLM2 (GGUF -> fp32 safetensors cache -> bridge).

Cold = dequantize the GGUF and write the cache (in a fresh temp cache dir); warm = load from that cache,
which includes verifying the entry (sizes at once, sha256 in a background thread during the load). The
sha256 of the entry alone is reported too: the cost the background thread hides. Library import time
(torch, transformers, transformer_lens) is reported apart: it is paid once per process.
Run: .venv/bin/python benchmarks/load.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    start = time.perf_counter()
    from circuitlab import load_model

    import_circuitlab_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CIRCUITLAB_CACHE"] = tmp
        cold = load_model("smollm2-135m")
        warm_times = []
        for _ in range(3):
            warm = load_model("smollm2-135m")
            warm_times.append(warm.load_s)
        from circuitlab.models import cache

        start = time.perf_counter()
        cache.check_entry(Path(warm.extra["cache_dir"]))
        verify_s = time.perf_counter() - start
    print(f"import circuitlab           {import_circuitlab_s:6.2f} s")
    print(f"import torch/transformers/TL {cold.extra['import_s']:6.2f} s (first load_model call only)")
    print(f"cold load (dequantize+cache) {cold.load_s:6.2f} s")
    print(f"warm load (from cache)       {min(warm_times):6.2f} s (best of 3; all: {', '.join(f'{t:.2f}' for t in warm_times)})")
    print(f"sha256 of the cache entry    {verify_s:6.2f} s (hidden behind the warm load, in a thread)")
    print(f"ratio cold/warm              {cold.load_s / min(warm_times):6.1f}x")


if __name__ == "__main__":
    main()
