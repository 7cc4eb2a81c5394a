"""The train step compiled ahead of time for a slice we do not have: its memory and speed.

`plan(config, topology)` builds the REAL train step (train/step.py, the
state's shardings from train/state.py, the batch layout from layout.py)
for the topology's compile-only devices (parallel/topology.py), lowers it from
abstract inputs only (`jax.ShapeDtypeStruct`s with their shardings: no array
is ever made on those devices), compiles it with the target's own compiler,
and reads back what that compiler planned (MaxText's train_compile):

- memory per device (`memory_analysis()`): arguments, outputs, the outputs
  aliased to donated arguments, temporaries and code; total = arguments +
  outputs - aliased + temporaries + code, against the chip's HBM
  (perf.CHIPS). A step that cannot fit fails inside the compiler, and that
  message comes back as a `DoesNotFitError` naming the settings to change;
  so does a step that compiles but whose total exceeds the HBM (the TPU
  compiler has accepted such steps, e.g. the 1.1B with pure data
  parallelism on v4-8: 35 GiB).
- rows: how the config's rows hold its dataset's examples, measured by the
  packer on class prompts made with the config's tokenizer
  (data.datasets.class_prompt_rows): the padding, the images per step. Not
  measured (and said so) without a readable tokenizer or for a dataset
  without classes.
- FLOPs: the model's (model.build.train_flops_counter; forward + backward, no
  rematerialisation) of the non-padding tokens, which MFU counts, and of the
  whole rows, which the chips compute; XLA's own count for reference, which
  sees the body of every `scan` once: the layers and the micro-batches of
  gradient accumulation.
- step time: XLA's `optimal_seconds` is an estimate of the program it
  counted, so it also sees one layer of one micro-batch; it is scaled by the
  model FLOPs of the whole step over those of that counted program (one
  layer, batch_size / grad_accum_steps rows). Without it (cost_analysis gives
  none), the step at 100% of the chips' peak: a lower bound of the time.
  MFU is the model FLOPs of the non-padding tokens over that time at the
  chips' peak.

GPU targets (`h100-N`, through JAX's CUDA plugin: parallel/topology.py) give
the memory the same way (their compiler checks no memory limit) and no cost
analysis, so the step time is the peak bound; so is it on v4, v5e and v6e,
whose `optimal_seconds` comes out negative (libtpu 0.0.42; v5p's is positive).
"""

from __future__ import annotations

import dataclasses
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from monoformer_jax.data.datasets import RowUse, class_prompt_rows
from monoformer_jax.diffusion.gaussian import from_config
from monoformer_jax.errors import DoesNotFitError, UserError
from monoformer_jax.layout import batch_shapes
from monoformer_jax.model.build import train_flops_counter, train_flops_per_row
from monoformer_jax.parallel import sharding
from monoformer_jax.parallel.topology import Topology, devices_of
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.checks import check_batch_layout, check_train_config
from monoformer_jax.train.state import make_optimizer, state_shardings
from monoformer_jax.train.step import healthy, make_train_step

GIB = 2**30
# A Pallas kernel in the lowered module: Mosaic on TPU, Triton on GPU.
KERNEL_CALLS = {"tpu": ("Mosaic", "tpu_custom_call"), "gpu": ("Triton", "__gpu$xla.gpu.triton")}


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What the compiler planned for one train step; bytes are per device."""

  topology: str
  chip: str
  devices: int
  slices: int
  mesh: dict
  remat: bool
  batch_size: int
  seq_len: int
  grad_accum_steps: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  model_flops: float  # the whole step's rows, padding included, all devices
  useful_flops: float  # of the non-padding tokens (= model_flops when not measured)
  padding: float | None  # the share of columns holding no example; None: not measured
  images_per_step: float | None
  rows: str  # how the rows hold the examples, or why that is not measured
  xla_flops: float | None  # per device, each scan body counted once
  xla_seconds: float | None  # XLA's optimal_seconds of what it counted
  step_seconds: float  # the estimate (see `estimate`)
  estimate: str  # 'xla' (scaled optimal_seconds) or 'peak'
  peak_tflops: float  # per chip
  platform: str  # 'tpu' or 'gpu'
  kernel_calls: int  # Pallas kernel calls in the lowered module
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    return planned_total(
      self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes, self.code_bytes
    )

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  @property
  def mfu(self) -> float:
    """Of the non-padding tokens' FLOPs (all of them when not measured)."""
    return self.useful_flops / (self.step_seconds * self.devices * self.peak_tflops * 1e12)

  @property
  def images_per_s_per_chip(self) -> float | None:
    if self.images_per_step is None:
      return None
    return self.images_per_step / self.step_seconds / self.devices

  def as_json(self) -> dict:
    return dict(
      dataclasses.asdict(self),
      total_bytes=self.total_bytes,
      fits=self.fits,
      mfu=self.mfu,
      images_per_s_per_chip=self.images_per_s_per_chip,
    )

  def report(self) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"
    xla = (
      "none"
      if self.xla_flops is None
      else f"{self.xla_flops:.3e} FLOPs per device, optimal_seconds "
      f"{self.xla_seconds if self.xla_seconds is not None else 'none'} "
      "(each scan body counted once: one layer of one micro-batch)"
    )
    how = (
      "XLA's optimal_seconds scaled from the one layer and micro-batch it counts to the whole step"
      if self.estimate == "xla"
      else "model FLOPs at 100% of the chips' bf16 peak: a lower bound of the time, an "
      "upper bound of the speed"
    )
    measured = self.padding is not None
    if measured:
      flops = (
        f"{self.useful_flops:.3e} of the non-padding tokens ({self.model_flops:.3e} with "
        "the padding the chips compute)"
      )
      if self.images_per_step:
        flops += f", {self.useful_flops / self.images_per_step:.3e} per image"
    else:
      flops = f"{self.model_flops:.3e}, every column counted (padding not measured)"
    counted = "of the non-padding tokens" if measured else "of every column"
    counted_tokens = "non-padding tokens/s" if measured else "tokens/s"
    tokens = (1 - (self.padding or 0.0)) * self.batch_size * self.seq_len
    tokens /= self.step_seconds * self.devices
    where = (
      f"{self.slices} slice{'s' if self.slices > 1 else ''}"
      if self.platform == "tpu"
      else f"{self.devices} GPUs"
    )
    return "\n".join(
      [
        f"train step for {self.topology}: {self.devices} x {self.chip} ({where}), "
        f"mesh {self.mesh}, "
        f"remat {self.remat}, {self.batch_size} rows x {self.seq_len} tokens, "
        f"grad_accum_steps {self.grad_accum_steps}; compiled in {self.compile_seconds:.0f} s",
        f"memory per device: arguments {gib(self.argument_bytes)}, outputs "
        f"{gib(self.output_bytes)}, aliased {gib(self.alias_bytes)}, temporaries "
        f"{gib(self.temp_bytes)}, code {gib(self.code_bytes)}",
        f"  total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM: "
        + ("fits" if self.fits else "does NOT fit"),
        f"rows: {self.rows}",
        f"model FLOPs per step: {flops}",
        f"XLA's cost analysis: {xla}",
        f"estimated step time: {self.step_seconds * 1e3:.4g} ms ({how})",
        f"  MFU {100 * self.mfu:.1f}% {counted}"
        + (" (by construction)" if self.estimate == "peak" else "")
        + f" at {self.peak_tflops:g} TFLOP/s per chip; {tokens:,.0f} {counted_tokens} per "
        "device"
        + (
          f"; {self.images_per_s_per_chip:,.1f} images/s per chip" if self.images_per_step else ""
        ),
        f"Pallas ({KERNEL_CALLS[self.platform][0]}) kernel calls in the lowered step: "
        f"{self.kernel_calls}",
      ]
    )


def planned_total(arguments: int, outputs: int, aliased: int, temporaries: int, code: int) -> int:
  """Bytes per device a compiled program needs: outputs donated into arguments
  (aliased) are counted once."""
  return arguments + outputs - aliased + temporaries + code


def memory_plan(compiled) -> dict[str, int]:
  """The compiler's memory plan per device (`memory_analysis()`), in bytes, with
  its total (`planned_total`)."""
  m = compiled.memory_analysis()
  plan = dict(
    arguments=m.argument_size_in_bytes,
    outputs=m.output_size_in_bytes,
    aliased=m.alias_size_in_bytes,
    temporaries=m.temp_size_in_bytes,
    code=m.generated_code_size_in_bytes,
  )
  return dict(plan, total=planned_total(**plan))


def abstract_inputs(config, mesh, abstract, shardings):
  """(state, batch, health) as ShapeDtypeStructs with their shardings."""
  rules = config.sharding_rules
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  batch = {
    name: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, rules, len(shape))
    )
    for name, (shape, dtype) in batch_shapes(config).items()
  }
  replicated = NamedSharding(mesh, P())
  health = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(healthy)
  )
  return state, batch, health


def lower_train_step(config, devices):
  """The train step of `config` lowered for `devices` (e.g. a topology's
  compile-only ones) from abstract inputs; returns (lowered, mesh)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  check_batch_layout(config, mesh, len({d.process_index for d in devices}))
  rules = config.sharding_rules
  # Outside the mesh context: the optimizer's placeholder state and the step's
  # base key are small arrays made eagerly, which must land on this host and
  # not on the target's devices (which hold no arrays).
  tx, schedule = make_optimizer(config.optim, config.model, config.train.num_steps)
  graphdef, abstract, shardings = state_shardings(config, mesh, tx)
  diffusion = from_config(config.diffusion)
  step = make_train_step(
    graphdef, diffusion, config, tx, schedule, shardings, sharding.batch_sharding(mesh, rules, 1)
  )
  state, batch, health = abstract_inputs(config, mesh, abstract, shardings)
  with jax.set_mesh(mesh), sharding.logical_rules(rules):
    return step.lower(state, batch, health), mesh


def _fixes(config, message: str) -> str:
  """The settings that shrink the step's memory, from the current ones."""
  m, mesh = config.model, config.mesh
  accum = config.optim.grad_accum_steps
  fewer_rows = (
    f"fewer rows per pass: --config.optim.grad_accum_steps={2 * accum} "
    f"(or --config.data.batch_size below {config.data.batch_size})"
  )
  if "hbm" not in message.lower():
    # A kernel's on-chip SMEM/VMEM (e.g. the attention's block map of every
    # row on the device), which only fewer rows or tokens per device shrink.
    return (
      f"{fewer_rows}; a shorter --config.data.seq_len; or more chips over the "
      "batch (--config.mesh.data / --config.mesh.fsdp, a larger --topology)"
    )
  fixes = []
  if not (mesh.data == 1 and mesh.fsdp == -1):
    fixes.append(
      "shard the weights and optimizer state over every chip "
      "(--config.mesh.data=1 --config.mesh.fsdp=-1)"
    )
  tensor = max(1, int(mesh.tensor))
  fixes.append(
    f"more tensor parallelism (--config.mesh.tensor={2 * tensor}: heads and MLP split further)"
    if tensor > 1
    else "tensor parallelism (--config.mesh.tensor=2 or 4: heads and MLP split)"
  )
  if not m.remat:
    fixes.append(
      "recompute each layer's activations in the backward pass (--config.model.remat=True)"
    )
  fixes.append(fewer_rows)
  fixes.append("or a larger slice (--topology)")
  return "; ".join(fixes)


def _compiler_message(error: Exception, lines: int = 4) -> str:
  text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return " ".join(text[:lines])


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per program in older jax
    cost = cost[0] if cost else None
  return dict(cost or {})


def counted_once_flops(config) -> float:
  """Model FLOPs of the program XLA's cost analysis counts: one layer (the
  scan's body) for one micro-batch (gradient accumulation's body)."""
  one_layer = config.model.copy_and_resolve_references()
  one_layer.num_layers = 1
  rows = config.data.batch_size // config.optim.grad_accum_steps
  return train_flops_per_row(one_layer, config.data.seq_len) * rows


def measured_rows(config) -> tuple[RowUse | None, str]:
  """(how the config's rows hold its class-prompted images, that said in
  words), or (None, why it is not measured): a dataset without classes, or no
  tokenizer readable here (a plan needs none, so that is no error)."""
  unmeasured = "padding not measured: {}; FLOPs and MFU count every column"
  if not config.data.tokenizer:
    why = "data.tokenizer is empty (pass --config.data.tokenizer=... to measure it)"
    return None, unmeasured.format(why)
  try:
    tokenizer = tokenizer_of(config)
  except UserError as error:
    return None, unmeasured.format(f"the tokenizer cannot be read here ({error})")
  row_use = class_prompt_rows(config, tokenizer)
  if row_use is None:
    why = f"data.name={config.data.name!r} has no class prompts to lay out"
    return None, unmeasured.format(why)
  return row_use, (
    f"{row_use.describe()}, measured by the packer on {row_use.examples} class prompts "
    f"made with data.tokenizer={config.data.tokenizer!r}"
  )


def plan(config, topology: Topology) -> tuple[StepPlan, str]:
  """(StepPlan, lowered module text) of the train step of `config` compiled for
  `topology`'s compile-only devices. Raises DoesNotFitError with the
  compiler's message when the step cannot fit."""
  config = config.copy_and_resolve_references()
  config.train.init_from = ""  # no weights are read: plan a run whose start is elsewhere
  config = check_train_config(config, reads_data=False)
  row_use, rows = measured_rows(config)
  devices = devices_of(topology)
  t0 = time.perf_counter()
  lowered, mesh = lower_train_step(config, devices)
  text = lowered.as_text()
  chip = topology.chip
  failure = None
  # A compile-only executable goes into JAX's persistent compilation cache but
  # cannot be read back ("PjRtCompiler must be constructed with a Client"):
  # none is written, rather than tens of MB per plan that warn when read.
  min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    failure = _compiler_message(error)
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
  if failure is not None:  # raised here, so the compiler's traceback is not its cause
    raise DoesNotFitError(
      f"the train step does not fit {topology.name} ({topology.chips} x {chip.name}, "
      f"{chip.hbm_gib:g} GiB HBM each) "
      f"with mesh {dict(mesh.shape)}, model.remat={config.model.remat}, "
      f"data.batch_size={config.data.batch_size} x data.seq_len={config.data.seq_len}, "
      f"optim.grad_accum_steps={config.optim.grad_accum_steps}. The compiler says: "
      f"{failure} To fit it: {_fixes(config, failure)}"
    )
  seconds = time.perf_counter() - t0
  memory = memory_plan(compiled)
  cost = _cost(compiled)
  flops_of, length = train_flops_counter(config.model), config.data.seq_len
  model_flops = flops_of(length, length**2) * config.data.batch_size  # whole rows, padding in
  useful_flops, images = model_flops, None
  if row_use is not None:  # the measured rows' averages, for the step's rows
    per_step = config.data.batch_size / row_use.rows
    useful_flops = flops_of(row_use.tokens * per_step, row_use.attended * per_step)
    images = row_use.images * per_step
  xla_seconds = cost.get("optimal_seconds")
  if xla_seconds is not None and xla_seconds > 0:
    step_seconds, estimate = xla_seconds * model_flops / counted_once_flops(config), "xla"
  else:
    step_seconds, estimate = model_flops / (len(devices) * chip.bf16_tflops * 1e12), "peak"
  result = StepPlan(
    topology=topology.name,
    chip=chip.name,
    devices=len(devices),
    slices=topology.num_slices,
    mesh=dict(mesh.shape),
    remat=bool(config.model.remat),
    batch_size=config.data.batch_size,
    seq_len=config.data.seq_len,
    grad_accum_steps=config.optim.grad_accum_steps,
    argument_bytes=memory["arguments"],
    output_bytes=memory["outputs"],
    alias_bytes=memory["aliased"],
    temp_bytes=memory["temporaries"],
    code_bytes=memory["code"],
    hbm_bytes=int(chip.hbm_gib * GIB),
    model_flops=model_flops,
    useful_flops=useful_flops,
    padding=None if row_use is None else row_use.padding,
    images_per_step=images,
    rows=rows,
    xla_flops=cost.get("flops"),
    xla_seconds=xla_seconds,
    step_seconds=step_seconds,
    estimate=estimate,
    peak_tflops=chip.bf16_tflops,
    platform=topology.platform,
    kernel_calls=text.count(KERNEL_CALLS[topology.platform][1]),
    compile_seconds=seconds,
  )
  if not result.fits:
    checked = (
      "XLA's GPU compiler plans the buffers but checks no limit"
      if topology.platform == "gpu"
      else "the TPU compiler accepted it"
    )
    gib = lambda b: f"{b / GIB:.1f}"
    raise DoesNotFitError(
      f"the train step does not fit {topology.name} ({topology.chips} x {chip.name}, "
      f"{chip.hbm_gib:g} GiB each) with mesh {result.mesh}, model.remat="
      f"{config.model.remat}, data.batch_size={config.data.batch_size} x data.seq_len="
      f"{config.data.seq_len}, optim.grad_accum_steps={config.optim.grad_accum_steps}: "
      f"{checked}, but its memory per device adds up to {gib(result.total_bytes)} GiB "
      f"(arguments {gib(result.argument_bytes)} + outputs {gib(result.output_bytes)} - "
      f"aliased {gib(result.alias_bytes)} + temporaries {gib(result.temp_bytes)} + code "
      f"{gib(result.code_bytes)}). To fit it: {_fixes(config, 'hbm')}"
    )
  return result, text
