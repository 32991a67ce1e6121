"""llama.cpp as the reference of the benchmarks (coldstart.py, decode_real.py): where its Python
binding lives, and the real model's GGUF requantized by llama.cpp's own quantizer, made once per
kind and cached."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

LLAMA_PYTHON = Path.home() / ".cache" / "hyprstream-bench" / "venv" / "bin" / "python"
QUANT_CACHE = Path.home() / ".cache" / "hyprstream-bench" / "coldstart"
BUILD_HINT = ("python3 -m venv --system-site-packages ~/.cache/hyprstream-bench/venv && "
              "~/.cache/hyprstream-bench/venv/bin/pip install llama-cpp-python   (a 15-25 min compile)")
# kind: (llama.cpp's ftype, made from: None is the Q4_1 GGUF itself). Q8_0 and Q4_K_M are made from
# the F16 file, as llama.cpp's users quantize: requantized straight from Q4_1, Q8_0 answers, like the
# Q4_1 file itself, "L'Étoile, la Cité, ..." (greedy decoding on a 135M model tips on small differences).
KINDS = {"F16": ("LLAMA_FTYPE_MOSTLY_F16", None), "BF16": ("LLAMA_FTYPE_MOSTLY_BF16", None),
         "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "F16"), "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "F16")}
QUANTIZE = """import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def llama_files(python: str, gguf: Path, kinds: list[str]) -> dict[str, Path]:
    """`gguf` requantized to each of `kinds` (and what they are made from) into QUANT_CACHE, once."""
    QUANT_CACHE.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    needed = list(dict.fromkeys([s for k in kinds if (s := KINDS[k][1])] + kinds))  # sources first
    for kind in needed:
        ftype, source = KINDS[kind]
        dest = QUANT_CACHE / f"{gguf.stem.rsplit('.', 1)[0]}.{kind}.gguf"
        if not dest.is_file():
            print(f"llama.cpp: making {dest.name}...", flush=True)
            part = dest.with_name(dest.name + ".incomplete")
            subprocess.run([python, "-c", QUANTIZE, str(files[source] if source else gguf), str(part), ftype],
                           check=True, capture_output=True)
            os.replace(part, dest)
        files[kind] = dest
    return files
