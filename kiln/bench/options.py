"""What one `kiln bench` run measures: the engine (given, or made from dummy weights) and the cases."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.config import DTYPES, ConfigError
from kiln.models import PRESETS


@dataclass
class BenchOptions:
    """A benchmark run: one engine (`engine_dir`, or dummy weights of `preset`/`config`), every batch size in
    `batch_sizes` with random prompts of `input_len` tokens and `output_len` generated tokens (end tokens ignored)."""

    engine_dir: str | None = None
    preset: str | None = None
    config: str | None = None  # a Hugging Face style config.json for dummy weights
    num_layers: int | None = None  # dummy weights: keep only the first N layers (a slice at full width)
    dtype: str | None = None  # dummy weights' dtype (default: the preset's or config's)
    kv_cache_dtype: str | None = None  # dummy weights: "int8" or "fp8" KV cache (unit scales); None: the dtype's
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    input_len: int = 128
    output_len: int = 128
    warmup: int = 1  # untimed runs of each case before the timed one
    compare_hf: bool = False
    output_json: str | None = None
    kv_cache_free_gpu_memory_fraction: float | None = None  # default 0.9, or 0.3 with compare_hf
    kernel_backend: str = "auto"
    async_scheduling: bool = True  # launch each step before the previous one's tokens reach the host
    device: str | None = None  # default: cuda when present
    tune: bool = True  # dummy engines: tune the kernels at build (on a GPU)
    seed: int = 0
    # dummy weights converted sharded, as `kiln convert` (kiln.bench.multirank): tp x pp ranks, experts split
    tp_size: int = 1
    pp_size: int = 1
    moe_tp_mode: int = 2  # 1: experts placed whole (expert parallel), 2: every expert split (tensor parallel)
    moe_tp_size: int = -1
    moe_ep_size: int = -1
    # dummy weights: each precision's engine is converted, built and timed in turn (none: the unquantized dtype);
    # several give a side-by-side table (kiln.bench.precisions). Empty: unquantized only.
    weight_only_precision: list[str] = field(default_factory=list)
    group_size: int = 128  # int4_awq / int4_gptq
    quantize_lm_head: bool = False  # the weight-only precisions quantize the LM head too
    # dummy weights drawn by each rank into its parameters at load, never written (kiln.checkpoint.in_memory);
    # None: in memory unless compare_hf (transformers is given the weights from the rank file)
    weights_in_memory: bool | None = None

    @property
    def dummy(self) -> bool:
        return self.engine_dir is None

    @property
    def in_memory(self) -> bool:
        """Whether the dummy engine's weights are drawn in memory rather than written to rank files."""
        return self.dummy and (self.weights_in_memory if self.weights_in_memory is not None else not self.compare_hf)

    @property
    def kv_fraction(self) -> float:
        """The KV cache's share of free GPU memory: less with compare_hf, so that transformers' model fits even if
        freeing kiln's memory before it does not give everything back (the cases need little KV cache anyway)."""
        if self.kv_cache_free_gpu_memory_fraction is not None:
            return self.kv_cache_free_gpu_memory_fraction
        return 0.3 if self.compare_hf else 0.9

    def validate(self) -> None:
        """Raise ConfigError (one line: what is wrong and what to do) for options no run can use."""
        sources = [name for name in ("engine_dir", "preset", "config") if getattr(self, name)]
        if not sources:
            raise ConfigError("nothing to benchmark: give --engine_dir E, or --preset NAME / --config FILE for an "
                              "engine of dummy weights")
        if len(sources) > 1:
            given = " and ".join("--" + s for s in sources)
            raise ConfigError(f"give one of --engine_dir, --preset or --config, not {given}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        if self.engine_dir is not None and (self.num_layers is not None or self.dtype is not None):
            raise ConfigError("--num_layers and --dtype shape dummy weights (--preset/--config); an engine "
                              "(--engine_dir) already has its layers and dtype")
        if self.kv_cache_dtype is not None and self.engine_dir is not None:
            raise ConfigError("--kv_cache_dtype shapes a dummy engine (--preset/--config); an engine (--engine_dir) "
                              "has the KV cache it was converted with")
        if self.kv_cache_dtype not in (None, "int8", "fp8"):
            raise ConfigError(f"unknown --kv_cache_dtype {self.kv_cache_dtype!r}; choose int8 or fp8 (or leave it "
                              "out for the model dtype)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        self._check_numbers()
        if self.weights_in_memory and self.engine_dir is not None:
            raise ConfigError("--weights_in_memory draws dummy weights (--preset/--config) at load; an engine "
                              "(--engine_dir) has its weights in its rank files")
        if self.weights_in_memory and self.compare_hf:
            raise ConfigError("--weights_in_memory draws dummy weights at load; --compare_hf needs them in a rank "
                              "file for transformers: drop one of the two")
        if self.quantize_lm_head and not self.weight_only_precision:
            raise ConfigError("--quantize_lm_head goes with --weight_only_precision (an engine given with --engine_dir "
                              "was quantized, head included or not, by kiln convert)")
        if self.weight_only_precision:
            from kiln.bench.precisions import check_precisions

            check_precisions(self)
        from kiln.bench.multirank import validate

        validate(self)

    def _check_numbers(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"--batch_size needs one or more sizes >= 1, got {self.batch_sizes}")
        if self.input_len < 1:
            raise ConfigError(f"--input_len must be >= 1, got {self.input_len}")
        if self.output_len < 2:
            raise ConfigError(f"--output_len must be >= 2 (decode steps are timed after the first token), "
                              f"got {self.output_len}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"--num_layers must be >= 1, got {self.num_layers}")
        fraction = self.kv_cache_free_gpu_memory_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigError(f"--kv_cache_free_gpu_memory_fraction must be in (0, 1], got {fraction}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"unknown --kernel_backend {self.kernel_backend!r}; choose auto, torch or triton")
