"""Mixture-of-experts sharing: MMoE, CGC, PLE and DSelect-k, with ResNet stages as experts.

Every model here splits the backbone (:mod:`mtjax.models.backbones`) in two: a **trunk**, the
stem and the first ``N - expert_stages`` stages (shared by all tasks, as hard sharing shares its
backbone), and **experts**, copies of the last ``expert_stages`` stages (one level of
PLE is one stage), each with its own parameters, all reading the trunk's output; both are
:class:`backbones.Stages`, run by the backbone's own stage runner (the trunk has the backbone's
parameter names; an expert's blocks are numbered from 0). The papers'
experts are whole networks on the raw input (LibMTL: whole backbones); stages of one backbone
keep the models small enough for a CPU and keep the head's input the same as hard sharing's (the
last stage's channels and stride), so every task head works unchanged. With
``expert_stages = N`` the trunk is the stem alone.

Gates are linear maps of the **gate input**, the trunk's output (PLE: the previous level's
output) averaged over space, ``x̄ = mean_{h,w} trunk(x)`` (C channels): the papers gate on the
experts' input (Ma et al., 2018, eq. 6: ``g^k(x) = softmax(W_gk x)``); LibMTL gates on the
flattened image, whose size grows with the image (H·W·3·E weights per gate); the pooled trunk
output keeps a gate at ``(C + 1)·E`` parameters at any image size. Gates are computed in
float32 (also under ``model.dtype = "bfloat16"``) and initialised with Flax's defaults (LeCun
normal kernel, zero bias), except DSelect-k's (below).

Parameter counts, with ``P_hard`` the hard-sharing model of the same backbone and heads
(:func:`mtjax.models.build`), ``P_i`` the parameters of backbone stage ``i`` (of ``N``),
``P_last = Σ`` of the last ``expert_stages`` stages' ``P_i``, ``C`` the trunk output's channels
(``width·2^(s-1)``, ×4 for a bottleneck ResNet, ``width`` when ``s = N - expert_stages`` is 0)
``T`` the number of tasks, ``E = num_experts``, ``S = num_shared_experts``,
``E_t = num_task_experts``, ``k = num_nonzeros`` and ``L = num_levels``:

- ``mmoe``: ``P_hard + (E - 1)·P_last + T·(C + 1)·E``;
- ``cgc``: ``P_hard + (S + T·E_t - 1)·P_last + T·(C + 1)·(S + E_t)``;
- ``ple`` (level ``j`` is a copy of stage ``N - L + j``, its gates read ``C_{j-1}`` channels,
  those of stage ``N - L + j - 1``'s output):
  ``P_hard + Σ_j (S + T·E_t - 1)·P_{N-L+j} + Σ_j (C_{j-1} + 1)·[T·(S + E_t) + (S + T·E_t)·1{j<L}]``;
- ``dselect_k``: ``P_hard + (E - 1)·P_last + T·(C + 1)·k·(log2(E) + 1)``.

Learned task relations are sown into the ``"relations"`` collection (the step logs them as
``relations/<name>``): ``"gate/<task>"``, the batch mean of the task's gate weights over its
experts (shared experts first, then the task's own); PLE adds ``"gate/<task>/level<j>"`` and
``"gate/shared/level<j>"`` for its lower levels; DSelect-k adds ``"dselect_k/<task>/selectors"``
(the batch-mean ``(k, E)`` single-expert selector outputs) and ``"dselect_k/<task>/alpha"``
(their ``(k,)`` mixing weights). DSelect-k's entropy regulariser is an auxiliary loss
(``"aux_losses"``, :data:`mtjax.models.multitask.AUX_LOSSES`): ``"dselect_k/<task>/entropy"``.

Parity with LibMTL's ``MMoE``, ``CGC``, ``DSelect_k`` and ``PLE`` (the differences above, named
and substituted into LibMTL's run): ``tests/models/test_libmtl_parity.py``,
docs/architectures.md.

Labels (:mod:`mtjax.models.labels`): ``"shared/stem"``, ``"shared/stage<i>"`` (the trunk),
``"shared/expert<i>"`` (shared experts; PLE ``"shared/level<j>/expert<i>"``,
``"shared/level<j>/gate"``), ``"<task>/gate"``, ``"<task>/expert<i>"`` (CGC; PLE
``"<task>/level<j>/expert<i>"``, ``"<task>/level<j>/gate"``) and ``"<task>/head"``.
"""

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.models import backbones, labels, multitask
from mtjax.models.labels import SHARED
from mtjax.models.multitask import AUX_LOSSES, Common

# ----------------------------------------------------------------------------------------------
# Experts: runs of backbone stages (:class:`backbones.Stages`).


def run_experts(experts, x, train: bool):
  """The outputs of ``experts`` on ``x``, stacked on axis 1: ``(B, E, h, w, c)``; None if none."""
  return jnp.stack([expert(x, train) for expert in experts], axis=1) if experts else None


def concat_experts(*outputs):
  """The stacked outputs of several groups of experts, one after the other (None: no experts)."""
  return jnp.concatenate([o for o in outputs if o is not None], axis=1)


def gate_input(feature_map):
  """``(B, C)`` float32: the spatial mean of a ``(B, h, w, C)`` map, what the gates read."""
  return jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2))


def mix(weights, experts):
  """``Σ_e weights[b, e] · experts[b, e]``: ``(B, E)`` weights, ``(B, E, ...)`` expert outputs."""
  return jnp.einsum("be,be...->b...", weights.astype(experts.dtype), experts)


def batch_mean(x):
  """The mean over the batch (axis 0), float32: what is sown as a relation."""
  return jnp.mean(x.astype(jnp.float32), axis=0)


# ----------------------------------------------------------------------------------------------
# Gates.


class SoftmaxGate(nn.Module):
  """``softmax(W x̄ + b)`` over ``num_experts`` (Ma et al., 2018, eq. 6; Tang et al., 2020,
  eq. 2): per-example weights ``(B, E)``, non-negative, summing to 1."""

  num_experts: int

  @nn.compact
  def __call__(self, x):
    logits = nn.Dense(self.num_experts, dtype=jnp.float32)(x.astype(jnp.float32))
    return jax.nn.softmax(logits, axis=-1), {}


def smooth_step(t, gamma: float = 1.0):
  """The smooth step of Hazimeh et al. (2021, §3; from Hazimeh et al., 2020): 0 for
  ``t <= -γ/2``, 1 for ``t >= γ/2``, ``-2t³/γ³ + 3t/(2γ) + 1/2`` between; continuously
  differentiable, and exactly 0 or 1 (zero gradient) outside the band, so a trained selector
  reaches exact zeros."""
  cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def binary_codes(num_experts: int) -> np.ndarray:
  """``(E, m)`` bool, ``m = log2 E``: row ``e`` is the binary encoding of expert ``e``."""
  m = int(math.log2(num_experts))
  return np.array([[(e >> (m - 1 - j)) & 1 for j in range(m)] for e in range(num_experts)],
                  dtype=bool).reshape(num_experts, m)


def selector_outputs(z, codes, gamma: float = 1.0):
  """Single-expert selectors (Hazimeh et al., 2021, §3): ``r(z)_e = Π_j s(z_j)^{l(e)_j}
  (1 - s(z_j))^{1 - l(e)_j}`` for ``z`` ``(..., m)`` -> ``(..., E)``; with ``E = 2^m`` the entries
  sum to 1 for any ``z``, and are one-hot once every ``|z_j| >= γ/2``."""
  s = smooth_step(z, gamma)[..., None, :]  # (..., 1, m)
  return jnp.prod(jnp.where(jnp.asarray(codes), s, 1.0 - s), axis=-1)


class DSelectKGate(nn.Module):
  """The per-example DSelect-k gate (Hazimeh et al., 2021, §3, example-conditioned form).

  ``k = num_nonzeros`` single-expert selectors ``r(z_i)``, ``z = Z x̄`` ``(k, m)``, mixed by
  ``α = softmax(W x̄)`` ``(k,)``: weights ``Σ_i α_i r(z_i)`` ``(B, E)``, non-negative, summing to 1,
  with at most ``k`` non-zeros once the smooth steps saturate. Initialisation as the authors'
  code (google-research/dselect_k_moe): ``Z``'s kernel and bias uniform in ``±γ/100`` (every
  selector starts in the smooth band, near uniform over the experts), ``W``'s in ``±0.05``.
  Returns the weights and ``{"selectors": (B, k, E), "alpha": (B, k)}``. With
  ``entropy_reg > 0`` the model adds ``entropy_reg ·`` :func:`selector_entropy` of the selectors
  to a training pass's objective as an auxiliary loss.
  """

  num_experts: int
  num_nonzeros: int = 2
  gamma: float = 1.0
  entropy_reg: float = 0.0  # read by the model (:func:`_sow_entropy`), not by the gate

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    codes = binary_codes(self.num_experts)
    m = codes.shape[1]
    z_init = _uniform(self.gamma / 100)
    z = nn.Dense(self.num_nonzeros * m, dtype=jnp.float32, kernel_init=z_init, bias_init=z_init,
                 name="z_logits")(x)
    selectors = selector_outputs(z.reshape(x.shape[0], self.num_nonzeros, m), codes, self.gamma)
    w_init = _uniform(0.05)
    alpha = jax.nn.softmax(nn.Dense(self.num_nonzeros, dtype=jnp.float32, kernel_init=w_init,
                                    bias_init=w_init, name="w_logits")(x), axis=-1)
    weights = jnp.einsum("bk,bke->be", alpha, selectors)
    return weights, {"selectors": selectors, "alpha": alpha}


def selector_entropy(selectors):
  """``-Σ r log(r + 1e-6)`` over every entry of the single-expert selectors ``r``
  (``(B, k, E)``): the entropy of each selector, summed over the ``k`` selectors (the paper's
  ``Ω(Z) = Σ_i h(r(z_i))``, Hazimeh et al., 2021, §3) and over the batch, with the authors'
  ``EPSILON = 1e-6`` inside the log (google-research/dselect_k_moe, ``EntropyRegularizer``).
  Zero exactly when every selector is one-hot."""
  selectors = selectors.astype(jnp.float32)
  return -jnp.sum(selectors * jnp.log(selectors + 1e-6))


def _uniform(scale):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


# ----------------------------------------------------------------------------------------------
# Models.


def _label(model, path) -> str:
  """The label of ``path`` from the model's ``label_names()`` and its heads; the trunk is
  labelled by stage (:func:`mtjax.models.labels.from_table`)."""
  table = {**labels.heads_table(model.heads, "{}/head"), **dict(model.label_names())}
  return labels.from_table(table, path, type(model).__name__, trunk=("trunk", model.trunk))


def _sow_gate(module, task: str, weights, extras):
  module.sow("relations", f"gate/{task}", batch_mean(weights))
  for name, value in extras.items():
    module.sow("relations", f"dselect_k/{task}/{name}", batch_mean(value))


def _sow_entropy(module, task: str, gate, extras, train: bool):
  """DSelect-k's entropy regulariser ``entropy_reg · selector_entropy`` as an auxiliary loss
  ``"dselect_k/<task>/entropy"`` of a training pass (the authors add it in training only)."""
  reg = getattr(gate, "entropy_reg", 0.0)
  if train and reg and "selectors" in extras:
    module.sow(AUX_LOSSES, f"dselect_k/{task}/entropy", reg * selector_entropy(extras["selectors"]))


class MixtureOfExperts(nn.Module):
  """MMoE (Ma et al., 2018) and DSelect-k (Hazimeh et al., 2021): shared experts, one gate and
  one head per task: ``y_t = h_t(Σ_e g_t(x̄)_e f_e(trunk(x)))`` (Ma et al., eq. 5).

  Features (:meth:`encode`): ``{"experts": (B, E, h, w, c), "gate_input": (B, C)}``, every
  expert's output and the pooled trunk output the gates read: all of it depends on shared
  parameters only; the representation-level methods balance the task gradients of both.
  :meth:`decode` is the task's gate, the mixture and its head.
  """

  trunk: backbones.Stages
  experts: Sequence[backbones.Stages]
  gates: Mapping[str, nn.Module]  # SoftmaxGate (MMoE) or DSelectKGate
  heads: Mapping[str, nn.Module]

  def encode(self, images, train: bool = False):
    """The shared experts' outputs and the gate input (see the class docstring)."""
    x = self.trunk(images, train)
    return {"experts": run_experts(self.experts, x, train), "gate_input": gate_input(x)}

  def decode(self, features, task: str, output_size, train: bool = False):
    """``task``'s gate over the experts, their mixture, and ``task``'s head."""
    weights, extras = self.gates[task](features["gate_input"])
    _sow_gate(self, task, weights, extras)
    _sow_entropy(self, task, self.gates[task], extras, train)
    return self.heads[task](mix(weights, features["experts"]), tuple(output_size), train)

  def __call__(self, images, train: bool = False):
    features = self.encode(images, train)
    outputs = {t: self.decode(features, t, images.shape[1:3], train) for t in self.heads}
    return {"features": features, **outputs}

  def label_names(self):
    return ([(f"experts_{i}", f"{SHARED}/expert{i}") for i in range(len(self.experts))]
            + [(f"gates_{t}", f"{t}/gate") for t in self.heads])

  def param_label(self, path) -> str:
    """``"shared/stem"``, ``"shared/stage<i>"``, ``"shared/expert<i>"``; ``"<task>/gate"``,
    ``"<task>/head"``."""
    return _label(self, path)


class CustomizedGateControl(nn.Module):
  """CGC (Tang et al., 2020, §4.2, eqs. 1-3): shared experts and each task's own experts; task
  ``t``'s gate mixes the shared experts and its own: ``y_t = h_t(w_t(x̄) · [E_shared, E_t])``.

  Features (:meth:`encode`): ``{"trunk": (B, H', W', C), "experts": (B, S, h, w, c)}``, the
  trunk's output (the input of the task-specific experts and, pooled, of the gates) and the
  shared experts' outputs. :meth:`decode` runs the task's own experts on the trunk output, its
  gate, the mixture and its head: it reads only parameters labelled with the task.
  """

  trunk: backbones.Stages
  shared_experts: Sequence[backbones.Stages]
  task_experts: Mapping[str, Sequence[backbones.Stages]]
  gates: Mapping[str, nn.Module]
  heads: Mapping[str, nn.Module]

  def encode(self, images, train: bool = False):
    """The trunk output and the shared experts' outputs (see the class docstring)."""
    x = self.trunk(images, train)
    return {"trunk": x, "experts": run_experts(self.shared_experts, x, train)}

  def decode(self, features, task: str, output_size, train: bool = False):
    """``task``'s own experts, its gate over shared and own experts, the mixture, its head."""
    x = features["trunk"]
    own = run_experts(self.task_experts[task], x, train)
    weights, extras = self.gates[task](gate_input(x))
    _sow_gate(self, task, weights, extras)
    mixed = mix(weights, concat_experts(features["experts"], own))
    return self.heads[task](mixed, tuple(output_size), train)

  def __call__(self, images, train: bool = False):
    features = self.encode(images, train)
    outputs = {t: self.decode(features, t, images.shape[1:3], train) for t in self.heads}
    return {"features": features, **outputs}

  def label_names(self):
    return ([(f"shared_experts_{i}", f"{SHARED}/expert{i}")
             for i in range(len(self.shared_experts))]
            + [(f"task_experts_{t}_{i}", f"{t}/expert{i}")
               for t, experts in self.task_experts.items() for i in range(len(experts))]
            + [(f"gates_{t}", f"{t}/gate") for t in self.heads])

  def param_label(self, path) -> str:
    """``"shared/stem"``, ``"shared/stage<i>"``, ``"shared/expert<i>"``; ``"<task>/expert<i>"``,
    ``"<task>/gate"``, ``"<task>/head"``."""
    return _label(self, path)


class ProgressiveLayeredExtraction(nn.Module):
  """PLE (Tang et al., 2020, §4.3, eqs. 4-5): ``L`` stacked extraction levels (CGC layers).

  Level ``j`` (a copy of backbone stage ``N - L + j`` per expert) has shared experts, reading
  the shared stream ``g^{s,j-1}``, and each task's own experts, reading the task's stream
  ``g^{t,j-1}`` (both start as the trunk output). Task ``t``'s gate, on its stream, mixes the
  shared experts and its own into ``g^{t,j}`` (eq. 4); below the top level a shared gate of the
  same form, on the shared stream, mixes *every* expert of the level, all tasks' included, into
  ``g^{s,j}`` (§4.3; the top level has no shared gate: nothing reads it). The head reads
  ``g^{t,L}`` (eq. 5).
  LibMTL instead runs the shared experts on each task's stream and has no shared gate; this is
  the paper's structure.

  **No shared encoder.** From level 2 on, the shared stream depends on every task's lower-level
  experts (through the shared gate), so no part of the model before the heads depends on shared
  parameters only: there is no ``encode``/``decode``. The train step takes its general path
  (the per-task gradients of everything labelled shared, one ``vmap`` over the VJP of the loss
  vector) and refuses ``grad_level='representation'``. A task's experts below the top level
  also reach the other tasks through the shared stream; as task-labelled parameters they get
  the gradient of ``Σ_t L_t`` (gradient-level methods) or ``Σ_t w_t L_t`` (loss-level ones).
  With ``L = 1`` the model is CGC (which does have an encoder: use ``cgc``).
  """

  trunk: backbones.Stages
  shared_experts: Sequence[Sequence[backbones.Stages]]              # [level][expert]
  task_experts: Mapping[str, Sequence[Sequence[backbones.Stages]]]  # {task: [level][expert]}
  task_gates: Mapping[str, Sequence[nn.Module]]                     # {task: [level]}
  shared_gates: Sequence[nn.Module]                                 # [level], not the top one
  heads: Mapping[str, nn.Module]

  def __call__(self, images, train: bool = False):
    x = self.trunk(images, train)
    shared, streams = x, {t: x for t in self.heads}
    levels = len(self.shared_experts)
    for j in range(levels):
      shared_out = run_experts(self.shared_experts[j], shared, train)
      own = {t: run_experts(self.task_experts[t][j], streams[t], train) for t in self.heads}
      new_streams = {}
      for t in self.heads:
        weights, _ = self.task_gates[t][j](gate_input(streams[t]))
        name = f"gate/{t}" if j == levels - 1 else f"gate/{t}/level{j + 1}"
        self.sow("relations", name, batch_mean(weights))
        new_streams[t] = mix(weights, concat_experts(shared_out, own[t]))
      if j < levels - 1:
        weights, _ = self.shared_gates[j](gate_input(shared))
        self.sow("relations", f"gate/shared/level{j + 1}", batch_mean(weights))
        every = concat_experts(shared_out, *(own[t] for t in self.heads))
        shared = mix(weights, every)
      streams = new_streams
    return {t: self.heads[t](streams[t], tuple(images.shape[1:3]), train) for t in self.heads}

  def label_names(self):
    names = []
    for j, experts in enumerate(self.shared_experts):
      names += [(f"shared_experts_{j}_{i}", f"{SHARED}/level{j + 1}/expert{i}")
                for i in range(len(experts))]
    names += [(f"shared_gates_{j}", f"{SHARED}/level{j + 1}/gate")
              for j in range(len(self.shared_gates))]
    for t, levels in self.task_experts.items():
      for j, experts in enumerate(levels):
        names += [(f"task_experts_{t}_{j}_{i}", f"{t}/level{j + 1}/expert{i}")
                  for i in range(len(experts))]
        names.append((f"task_gates_{t}_{j}", f"{t}/level{j + 1}/gate"))
    return names

  def param_label(self, path) -> str:
    """``"shared/stem"``, ``"shared/stage<i>"``, ``"shared/level<j>/expert<i>"``,
    ``"shared/level<j>/gate"``; ``"<task>/level<j>/expert<i>"``, ``"<task>/level<j>/gate"``,
    ``"<task>/head"``."""
    return _label(self, path)


# ----------------------------------------------------------------------------------------------
# Builders.


def _hard(backbone, tasks, common):
  """The backbone and heads of the hard-sharing model (its argument checks included)."""
  hard = multitask.build(backbone, tasks, common)
  if SHARED in tasks:
    raise ValueError(f"tasks: a task may not be named {SHARED!r} (the shared parameters' label)")
  return hard.backbone, dict(hard.heads)


def _check_count(field: str, value, low: int = 1, high: int | None = None, why: str = ""):
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
  if not ok or (high is not None and value > high):
    bound = f">= {low}" if high is None else f"in {low}..{high}"
    raise ValueError(f"model.{field}: expected an int {bound}{why}, got {value!r}")


def _split(resnet, field: str, stages: int):
  """``(trunk, first expert stage)`` with the last ``stages`` stages left for the experts."""
  n = len(resnet.stage_sizes)
  _check_count(field, stages, 1, n, f" (the backbone has {n} stages)")
  return backbones.part(resnet, 0, n - stages), n - stages + 1


def build_mmoe(backbone: str, tasks: Mapping, common: Common, *,
               num_experts: int = 4, expert_stages: int = 1) -> MixtureOfExperts:
  """MMoE (Ma et al., 2018): ``num_experts`` shared experts (copies of the last
  ``expert_stages`` stages), a softmax gate and a head per task.

  Defaults: 4 experts (LibMTL's examples use 2; 4 matches ``dselect_k``'s default so the two
  gates can be compared on the same experts), one stage per expert.
  """
  resnet, heads = _hard(backbone, tasks, common)
  _check_count("num_experts", num_experts)
  trunk, first = _split(resnet, "expert_stages", expert_stages)
  n = len(resnet.stage_sizes)
  experts = [backbones.part(resnet, first, n) for _ in range(num_experts)]
  return MixtureOfExperts(trunk, experts, {t: SoftmaxGate(num_experts) for t in tasks}, heads)


def build_dselect_k(backbone: str, tasks: Mapping, common: Common, *,
                    num_experts: int = 4, num_nonzeros: int = 2, gamma: float = 1.0,
                    entropy_reg: float = 1e-6, expert_stages: int = 1) -> MixtureOfExperts:
  """DSelect-k (Hazimeh et al., 2021): MMoE's experts with a per-task, per-example DSelect-k
  gate selecting at most ``num_nonzeros`` (k) of ``num_experts`` experts.

  Defaults: k = 2 and γ = 1 (the authors' code and LibMTL), 4 experts (the smallest power of 2
  where top-2 is a selection). ``num_experts`` must be a power of 2: the binary encoding then
  reaches exactly the experts and each selector sums to 1; other counts need the authors'
  extra penalty ``Σ 1/Σ_e r(z)_e`` on unreachable codes.

  ``entropy_reg`` (default 1e-6, the default of the authors' ``EntropyRegularizer``
  (``schedule_fn = lambda x: 1e-6``) and LibMTL's constant): the weight ``λ`` of the entropy
  regulariser ``λ · Σ_{b,i} h(r(z_i(x_b)))`` (:func:`selector_entropy`, summed over the batch as
  the authors' code does), which pushes the selectors to a binary state sooner (Hazimeh et al.,
  2021, §3); 0 turns it off (the authors' gate without a regulariser). One auxiliary loss per
  task, ``"dselect_k/<task>/entropy"``, added to the objective after the task weighting and
  logged as ``loss/aux/dselect_k/<task>/entropy``. LibMTL regularises only the last task's gate
  (its loop leaves ``selector_outputs`` of the last task) and calls ``backward`` itself; here
  every task's gate is regularised.
  """
  resnet, heads = _hard(backbone, tasks, common)
  _check_count("num_experts", num_experts)
  if num_experts & (num_experts - 1):
    raise ValueError(f"model.num_experts: dselect_k needs a power of 2 (its experts are binary "
                     f"codes), got {num_experts}")
  _check_count("num_nonzeros", num_nonzeros, 1, num_experts, " (at most model.num_experts)")
  if (not isinstance(entropy_reg, (int, float)) or isinstance(entropy_reg, bool)
      or not entropy_reg >= 0):
    raise ValueError(f"model.entropy_reg: expected a float >= 0 (the entropy regulariser's "
                     f"weight; 0: none), got {entropy_reg!r}")
  if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma > 0:
    raise ValueError(f"model.gamma: expected a float > 0 (the smooth step's width), got "
                     f"{gamma!r}")
  trunk, first = _split(resnet, "expert_stages", expert_stages)
  n = len(resnet.stage_sizes)
  experts = [backbones.part(resnet, first, n) for _ in range(num_experts)]
  gates = {t: DSelectKGate(num_experts, num_nonzeros, float(gamma), float(entropy_reg))
           for t in tasks}
  return MixtureOfExperts(trunk, experts, gates, heads)


def build_cgc(backbone: str, tasks: Mapping, common: Common, *,
              num_shared_experts: int = 1, num_task_experts: int = 1,
              expert_stages: int = 1) -> CustomizedGateControl:
  """CGC (Tang et al., 2020): ``num_shared_experts`` shared experts, ``num_task_experts`` of
  each task's own, a softmax gate and a head per task. Defaults: one of each (LibMTL's examples).
  """
  resnet, heads = _hard(backbone, tasks, common)
  _check_count("num_shared_experts", num_shared_experts, 0)
  _check_count("num_task_experts", num_task_experts, 0)
  if num_shared_experts + num_task_experts == 0:
    raise ValueError("model.num_shared_experts, model.num_task_experts: a task needs at least "
                     "one expert, got 0 and 0")
  trunk, first = _split(resnet, "expert_stages", expert_stages)
  n = len(resnet.stage_sizes)
  shared = [backbones.part(resnet, first, n) for _ in range(num_shared_experts)]
  own = {t: [backbones.part(resnet, first, n) for _ in range(num_task_experts)] for t in tasks}
  gates = {t: SoftmaxGate(num_shared_experts + num_task_experts) for t in tasks}
  return CustomizedGateControl(trunk, shared, own, gates, heads)


def build_ple(backbone: str, tasks: Mapping, common: Common, *,
              num_shared_experts: int = 1, num_task_experts: int = 1,
              num_levels: int = 2) -> ProgressiveLayeredExtraction:
  """PLE (Tang et al., 2020): ``num_levels`` extraction levels, each one backbone stage (the
  last ``num_levels`` stages), with ``num_shared_experts`` shared and ``num_task_experts`` task
  experts per level. Defaults: one of each (LibMTL's examples), 2 levels (the paper's
  multi-level model; LibMTL uses one level per ResNet stage and the stem, 5).
  """
  resnet, heads = _hard(backbone, tasks, common)
  _check_count("num_shared_experts", num_shared_experts, 1,
               why=" (without shared experts the levels share nothing: use cgc)")
  _check_count("num_task_experts", num_task_experts, 0)
  trunk, first = _split(resnet, "num_levels", num_levels)
  n = len(resnet.stage_sizes)
  stages = range(first, n + 1)
  shared = [[backbones.part(resnet, s, s) for _ in range(num_shared_experts)] for s in stages]
  own = {t: [[backbones.part(resnet, s, s) for _ in range(num_task_experts)] for s in stages]
         for t in tasks}
  task_gates = {t: [SoftmaxGate(num_shared_experts + num_task_experts) for _ in stages]
                for t in tasks}
  shared_gates = [SoftmaxGate(num_shared_experts + len(tasks) * num_task_experts)
                  for _ in range(num_levels - 1)]
  return ProgressiveLayeredExtraction(trunk, shared, own, task_gates, shared_gates, heads)


ARCHITECTURES = {
    "mmoe": build_mmoe,
    "cgc": build_cgc,
    "ple": build_ple,
    "dselect_k": build_dselect_k,
}
