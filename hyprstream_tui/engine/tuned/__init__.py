"""Machine-tuned code, fenced: everything here makes the engine faster on some hardware and none of
it changes what a model computes beyond the rounding its docstrings state.

- `kernels`: linear layers that pick the faster kernel for the shape at hand (bf16 prefill through
  fp32 BLAS on CPUs without native bf16, fp32 rows-first products, the native one-row bf16 kernel);
- `gemv` + `gemv_bf16.c`: that native kernel, compiled on first use, checked bit for bit against
  torch's on load, off wherever the check or the compiler fails;
- `lean`: a decode step for Llama-shaped models without transformers' per-step glue;
- `step` + `step.c`: a whole decode step (and a prompt's tokens, each as its step) in one C call
  for the engine's own classes (int8/int4 and fp32 models; bf16 with HYPRSTREAM_FUSED_STEP=all);
  `step_abi`: its structures and library without torch; `step_image`: a quantized or fp32 model's
  image of what it reads, which `engine.light` runs without torch; `build`: compiling the C files;
- `quantize`: `--quantize int8`'s weight-only int8 layers; `quantize_int4`: `--quantize int4`'s
  group-wise int4 layers (torch's int4 CPU kernel); `quant_cache`: both, cached per model commit;
- `batch_cache`: the server's shared KV cache for continuous batching.

One switch turns the shape-picked kernels, the native kernels and the lean and fused steps off:
`LoadOptions(tuned=False)` loads plain `nn.Linear` layers and decodes through `model(...)`, torch's
and transformers' own paths (for comparisons and bisecting).
`--quantize int8`/`int4` is an option of its own; batching is the server's, not an optimisation to switch.
Nothing outside `engine` imports this package; the engine imports it lazily (torch at import,
except `build`, `step_abi`, `step_image` and `quant_cache`).
"""
