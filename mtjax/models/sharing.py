"""Sharing architectures beyond hard sharing: partial, cross-stitch, MTAN, PAD-Net, LTB.

Each follows the multi-task model contract (:mod:`mtjax.models.multitask`), is built from the
common ``config.model`` fields plus its own hyperparameters (keyword arguments with defaults;
see :mod:`mtjax.models`), states what its ``features`` are for representation-level methods
(or has no shared encoder, and then the train step refuses that level), and sows the learned
quantities that relate tasks into the ``"relations"`` collection.

Notation of the parameter-count formulas: ``N`` stages, ``T`` tasks, ``C_i`` the channels of
stage ``i`` (``width · 2^(i-1)``, ×4 for bottleneck blocks), ``P_stem``, ``P_i`` the parameters
of the backbone's stem and stage ``i``, ``P_backbone = P_stem + Σ_i P_i``, ``P_head_t`` task
``t``'s head. BatchNorm counts its scale and bias (2C); its running statistics are batch
statistics, not parameters.
"""

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax.models import backbones, labels
from mtjax.models.labels import SHARED
from mtjax.models.multitask import Common, DeepSupervision, backbone_and_heads


def _stage_names(plan: backbones.Plan):
  return [f"stage{i}" for i in range(1, len(plan.stages) + 1)]


def _check_int(name, value, low, high):
  if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
    raise ValueError(f"model.{name}: got {value!r}; expected an int in [{low}, {high}]")


def _mix(weights, xs):
  """``[Σ_s weights[t, s] xs[s]]_t`` for a list of equally shaped arrays ``xs``."""
  stacked = jnp.stack(xs)
  mixed = jnp.einsum("ts,s...->t...", weights.astype(stacked.dtype), stacked)
  return list(mixed)


# ---------------------------------------------------------------------------------------------
# partial: shared up to a stage, task-specific copies after it


class PartialSharing(nn.Module):
  """Shared stem and stages ``1..branch_stage``, a copy of stages ``branch_stage+1..N`` per task.

  The classic "branch point" of hard sharing (e.g. Vandenhende et al., 2020, survey §3.1;
  Guo et al., 2020 search over it). ``branch_stage = N`` is :class:`MultiTaskModel` (same
  computation), ``0`` shares the stem only.

  Features (representation level): the output of stage ``branch_stage`` (the stem's at 0).
  Parameters: ``P_stem + Σ_{i≤b} P_i + T · Σ_{i>b} P_i + Σ_t P_head_t``.
  """

  plan: backbones.Plan
  heads: Mapping[str, nn.Module]
  branch_stage: int

  def setup(self):
    stages = _stage_names(self.plan)
    self.shared = {"stem": backbones.Stages(self.plan, 0, 0),
                   **{s: backbones.Stages(self.plan, i, i) for i, s in enumerate(stages, 1)
                      if i <= self.branch_stage}}
    self.branches = {f"{task}_{s}": backbones.Stages(self.plan, i, i) for task in self.heads
                     for i, s in enumerate(stages, 1) if i > self.branch_stage}

  def encode(self, images, train: bool = False):
    x = self.shared["stem"](images, train)
    for i in range(1, self.branch_stage + 1):
      x = self.shared[f"stage{i}"](x, train)
    return x

  def decode(self, features, task: str, output_size, train: bool = False):
    x = features
    for i in range(self.branch_stage + 1, len(self.plan.stages) + 1):
      x = self.branches[f"{task}_stage{i}"](x, train)
    return self.heads[task](x, tuple(output_size), train)

  def __call__(self, images, train: bool = False):
    features = self.encode(images, train)
    return {"features": features,
            **{t: self.decode(features, t, images.shape[1:3], train) for t in self.heads}}

  def label_table(self) -> dict:
    """``{top-level name: label}`` (see :func:`mtjax.models.labels.from_table`)."""
    stages = _stage_names(self.plan)
    shared = ["stem", *stages[:self.branch_stage]]
    return {**{f"shared_{s}": f"{SHARED}/{s}" for s in shared},
            **{f"branches_{t}_{s}": f"{t}/{s}" for t in self.heads
               for s in stages[self.branch_stage:]},
            **labels.heads_table(self.heads)}

  def param_label(self, path) -> str:
    """``"shared/stem"``, ``"shared/stage<i>"``; ``"<task>/stage<i>"``; ``"<task>"`` (head)."""
    return labels.from_table(self.label_table(), path, "partial-sharing")


def build_partial(backbone: str, tasks: Mapping, common: Common, *,
                  branch_stage: int = 2) -> PartialSharing:
  """``partial``: shared up to stage ``branch_stage`` (default 2: for the 3-stage CPU backbone,
  one task-specific stage; 0..N allowed)."""
  trunk, heads, _ = backbone_and_heads(backbone, tasks, common)
  plan = backbones.plan_of(trunk)
  _check_int("branch_stage", branch_stage, 0, len(plan.stages))
  return PartialSharing(plan, heads, branch_stage)


# ---------------------------------------------------------------------------------------------
# cross_stitch: one network per task, linear combinations between stages


def cross_stitch_init(alpha_self: float):
  """``α`` with ``alpha_self`` on the diagonal and ``(1 - alpha_self) / (T - 1)`` elsewhere.

  Misra et al. (2016, §5) initialise ``(α_S, α_D) = (0.9, 0.1)`` for two tasks, rows summing
  to 1 (a convex combination); this is that for ``T`` tasks. ``alpha_self = 1``: the identity,
  independent networks.
  """
  def init(key, shape, dtype=jnp.float32):
    del key
    num_tasks = shape[0]
    off = (1.0 - alpha_self) / max(num_tasks - 1, 1)
    return (jnp.full(shape, off, dtype) + (alpha_self - off) * jnp.eye(num_tasks, dtype=dtype))
  return init


class CrossStitch(nn.Module):
  """Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert, CVPR 2016), Eq. (1).

  One backbone column per task; between stages ``i`` and ``i+1`` (``i < N``, as in LibMTL's
  ResNet version) a cross-stitch unit ``x̃_t = Σ_s α^i_{ts} x_s`` with a learned ``(T, T)``
  matrix ``α^i`` per unit, one scalar per pair of tasks (the paper's channel-independent
  form), initialised as :func:`cross_stitch_init` (Misra's (0.9, 0.1); LibMTL uses ones).
  Deviation: Misra et al. scale the learning rate of ``α`` (×10²–10³); here it is one
  parameter group, ``"shared/cross_stitch"``, whose scale ``config.optimizer.lr_scale`` sets.

  No shared encoder: every column can reach every task through ``α``, so the columns and
  ``α`` are labelled ``"shared"`` (the general path), and the representation level is refused.
  Relations: ``"cross_stitch/stage<i>"``, the ``(T, T)`` ``α^i``.
  Parameters: ``T · P_backbone + (N - 1) · T² + Σ_t P_head_t``.
  """

  plan: backbones.Plan
  heads: Mapping[str, nn.Module]
  alpha_self: float

  def setup(self):
    stages = _stage_names(self.plan)
    self.columns = {f"{t}_{s}": backbones.Stages(self.plan, i, i) for t in self.heads
                    for i, s in enumerate(["stem", *stages])}
    num_tasks = len(self.heads)
    self.units = [self.param(f"cross_stitch_stage{i}", cross_stitch_init(self.alpha_self),
                             (num_tasks, num_tasks)) for i in range(1, len(stages))]

  def __call__(self, images, train: bool = False):
    tasks = tuple(self.heads)
    xs = [self.columns[f"{t}_stem"](images, train) for t in tasks]
    for i in range(1, len(self.plan.stages) + 1):
      xs = [self.columns[f"{t}_stage{i}"](x, train) for t, x in zip(tasks, xs, strict=True)]
      if i < len(self.plan.stages):
        alpha = self.units[i - 1]
        self.sow("relations", f"cross_stitch/stage{i}", alpha)
        xs = _mix(alpha, xs)
    features = dict(zip(tasks, xs, strict=True))
    return {"features": features,
            **{t: self.heads[t](features[t], images.shape[1:3], train) for t in tasks}}

  def label_table(self) -> dict:
    """``{top-level name: label}`` (see :func:`mtjax.models.labels.from_table`)."""
    stages = _stage_names(self.plan)
    return {**{f"columns_{t}_{p}": f"{SHARED}/{t}/{p}" for t in self.heads
               for p in ["stem", *stages]},
            **{f"cross_stitch_stage{i}": f"{SHARED}/cross_stitch"
               for i in range(1, len(stages))},
            **labels.heads_table(self.heads)}

  def param_label(self, path) -> str:
    """``"shared/<task>/stem"``, ``"shared/<task>/stage<i>"`` (column ``task``),
    ``"shared/cross_stitch"`` (every ``α``), ``"<task>"`` (head)."""
    return labels.from_table(self.label_table(), path, "cross-stitch")


def build_cross_stitch(backbone: str, tasks: Mapping, common: Common, *,
                       alpha_self: float = 0.9) -> CrossStitch:
  """``cross_stitch``: ``alpha_self`` (default 0.9, Misra et al. §5): the initial weight of a
  task's own column in each unit, the rest spread evenly over the others."""
  trunk, heads, _ = backbone_and_heads(backbone, tasks, common)
  if not isinstance(alpha_self, (int, float)) or not 0.0 <= alpha_self <= 1.0:
    raise ValueError(f"model.alpha_self: got {alpha_self!r}; expected a float in [0, 1]")
  return CrossStitch(backbones.plan_of(trunk), heads, float(alpha_self))


# ---------------------------------------------------------------------------------------------
# mtan: a shared backbone and per-task attention over its stages


class _Attention(nn.Module):
  """``a = σ(BN(conv1×1(ReLU(BN(conv1×1(x))))))`` with ``hidden`` then ``channels`` outputs
  (MTAN's ``g``, ``h``; the official code's and LibMTL's ``att_layer``, whose hidden width is
  ``C / expansion``: ``C`` for basic blocks, ``C / 4`` for bottlenecks), without the
  convolutions' biases (a bias before BatchNorm has a zero gradient, which Adam would turn into
  noise; in evaluation it is a shift of BatchNorm's mean, which is how
  ``tests/models/test_libmtl_parity.py`` converts LibMTL's); parameters
  ``in·h + 2h + h·C + 2C``."""

  channels: int
  hidden: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    x = nn.relu(norm()(conv(self.hidden, (1, 1))(x)))
    return nn.sigmoid(norm()(conv(self.channels, (1, 1))(x)))


class _Transfer(nn.Module):
  """MTAN's ``f``: conv3×3 + BN + ReLU to the next stage's channels and resolution
  (stride ``strides``); parameters ``9 · C_in · C + 2C``."""

  channels: int
  strides: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = backbones._conv_and_norm(self.dtype, train)
    return nn.relu(norm()(conv(self.channels, (3, 3), self.strides, padding=1)(x)))


class MTAN(nn.Module):
  """Multi-Task Attention Network (Liu, Johns & Davison, CVPR 2019), Eqs. (1)–(2).

  A shared backbone; per task, at each stage ``i``, an attention mask
  ``a_i = h_i([p_i ; f_{i-1}(â_{i-1})])`` (``a_1 = h_1(p_1)``) over the stage's output ``p_i``
  and the attended feature ``â_i = a_i ⊙ p_i``; the task's head reads ``â_N``.
  Deviations, for CPU-sized backbones with one block per stage and for the model contract:
  the mask reads ``p_i`` (the paper, the official code (lorenmt/mtan, ``resnet_mtan.py``) and
  LibMTL read the output ``u_i`` of the stage's blocks but the last, and mask the last block's
  output ``p_i``); ``f`` is per task (the official code and LibMTL share it across tasks: here
  ``decode`` uses only its task's parameters) and a conv3×3 whose stride takes ``â_{i-1}`` to
  stage ``i``'s resolution (theirs: a residual block, then a max-pool). With exactly these
  differences substituted into LibMTL's forward, the outputs equal LibMTL's
  (``tests/models/test_libmtl_parity.py``, docs/architectures.md).

  Features (representation level): ``{"stage1": p_1, ..., "stageN": p_N}``, every stage of
  the shared backbone (what the attention modules read).
  Relations: ``"mtan/<task>/stage<i>"``, the batch-mean of ``a_i``.
  Parameters: ``P_backbone + T · [Σ_i (in_i h_i + 2 h_i + h_i C_i + 2 C_i) + Σ_{i<N} (9 C_i
  C_{i+1} + 2 C_{i+1})] + Σ_t P_head_t``, with ``in_1 = C_1``, ``in_i = 2 C_i`` for ``i > 1``
  and the attention's hidden width ``h_i = C_i`` (basic blocks) or ``C_i / 4`` (bottlenecks).
  """

  backbone: nn.Module
  heads: Mapping[str, nn.Module]

  def setup(self):
    plan = backbones.plan_of(self.backbone)
    channels, n = backbones.stage_channels(plan), len(plan.stages)
    expansion = 4 if plan.block == "bottleneck" else 1
    self.attention = {f"{t}_stage{i}": _Attention(channels[i], channels[i] // expansion,
                                                  plan.dtype)
                      for t in self.heads for i in range(1, n + 1)}
    # stride of f_i: stage i+1's first block's stride (1 when dilated).
    self.transfer = {f"{t}_stage{i}": _Transfer(channels[i + 1], plan.stages[i][0][1],
                                                 plan.dtype)
                     for t in self.heads for i in range(1, n)}

  def encode(self, images, train: bool = False):
    stages = self.backbone(images, train)
    return {k: v for k, v in stages.items() if k != "stem"}

  def decode(self, features, task: str, output_size, train: bool = False):
    n = len(features)
    attended = None
    for i in range(1, n + 1):
      p = features[f"stage{i}"]
      x = p if attended is None else jnp.concatenate(
          [p, self.transfer[f"{task}_stage{i - 1}"](attended, train)], axis=-1)
      mask = self.attention[f"{task}_stage{i}"](x, train)
      self.sow("relations", f"mtan/{task}/stage{i}", jnp.mean(mask.astype(jnp.float32)))
      attended = mask * p
    return self.heads[task](attended, tuple(output_size), train)

  def __call__(self, images, train: bool = False):
    features = self.encode(images, train)
    return {"features": features,
            **{t: self.decode(features, t, images.shape[1:3], train) for t in self.heads}}

  def label_table(self) -> dict:
    """``{top-level name: label}`` (see :func:`mtjax.models.labels.from_table`)."""
    n = len(backbones.plan_of(self.backbone).stages)
    return {**{f"attention_{t}_stage{i}": f"{t}/attention" for t in self.heads
               for i in range(1, n + 1)},
            **{f"transfer_{t}_stage{i}": f"{t}/attention" for t in self.heads
               for i in range(1, n)},
            **labels.heads_table(self.heads)}

  def param_label(self, path) -> str:
    """``"shared/stem"``, ``"shared/stage<i>"`` (backbone); ``"<task>/attention"`` (its masks
    and ``f``); ``"<task>"`` (head)."""
    return labels.from_table(self.label_table(), path, "MTAN",
                             trunk=("backbone", self.backbone))


def build_mtan(backbone: str, tasks: Mapping, common: Common) -> MTAN:
  """``mtan``: no hyperparameters beyond the backbone's."""
  trunk, heads, _ = backbone_and_heads(backbone, tasks, common)
  return MTAN(trunk, heads)


# ---------------------------------------------------------------------------------------------
# pad_net: intermediate predictions, then multi-modal distillation between tasks


class _ConvBN(nn.Module):
  """conv3×3 (no bias) + BN + ReLU, ``channels`` outputs: ``9 · C_in · C + 2C`` parameters."""

  channels: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = backbones._conv_and_norm(self.dtype, train)
    return nn.relu(norm()(conv(self.channels, (3, 3), padding=1)(x)))


class PADNet(nn.Module):
  """PAD-Net (Xu, Ouyang, Wang & Sebe, CVPR 2018): the attention-guided distillation, Eq. (3)–(4).

  A shared backbone; per task ``t`` an intermediate feature ``F_t = conv-BN-ReLU(p_N)`` and an
  intermediate prediction ``head'_t(F_t)`` (deep supervision); then for each task ``k`` the
  multi-modal distillation ``F°_k = F_k + Σ_{l≠k} G_k ⊙ (W_{l→k} ∗ F_l)`` with the attention
  map ``G_k = σ(W_g^k ∗ F_k)`` (3×3 convolutions), and the final head ``head_k(F°_k)``.
  Losses: task ``k``'s loss is ``L_k(final) + intermediate_weight · L_k(intermediate)``, the
  second term logged as ``loss/<k>/intermediate`` (:class:`DeepSupervision`; the paper sums
  the intermediate and final losses, weight 1). Deviations: one scale (the last stage) and
  the intermediate tasks are the tasks themselves (the paper also predicts auxiliary ones,
  e.g. contours); the intermediate features ``F_t`` are computed by the shared encoder, since
  every task's decoder reads every ``F_t``: their parameters are labelled
  ``"shared/pad_net/<t>"``.

  Features (representation level): ``{t: F_t}``, the intermediate features of every task.
  Relations: ``"pad_net/<k>/gate"``, the mean of ``G_k``, and ``"pad_net/<k>/<l>"``, the mean
  absolute message from ``l`` to ``k`` relative to the mean absolute ``F_k``.
  Parameters: ``P_backbone + T (9 C_N² + 2 C_N) + Σ_k [P'_head_k + P_head_k + (9 C_N² + C_N)
  + (T - 1) 9 C_N²]`` (``P'_head_k = P_head_k``: the intermediate head is the task's head type).
  """

  backbone: nn.Module
  heads: Mapping[str, nn.Module]
  intermediate_heads: Mapping[str, nn.Module]
  intermediate_weight: float

  def setup(self):
    channels = backbones.stage_channels(backbones.plan_of(self.backbone))[-1]
    dtype = self.backbone.dtype
    self.intermediate = {t: _ConvBN(channels, dtype) for t in self.heads}
    self.gates = {t: nn.Conv(channels, (3, 3), padding=1, dtype=dtype) for t in self.heads}
    self.messages = {f"{src}_to_{k}": nn.Conv(channels, (3, 3), padding=1, use_bias=False,
                                            dtype=dtype)
                     for k in self.heads for src in self.heads if src != k}

  def encode(self, images, train: bool = False):
    last = backbones.last_stage(self.backbone(images, train))
    return {t: self.intermediate[t](last, train) for t in self.heads}

  def decode(self, features, task: str, output_size, train: bool = False):
    own = features[task]
    intermediate = self.intermediate_heads[task](own, tuple(output_size), train)
    gate = nn.sigmoid(self.gates[task](own))
    self.sow("relations", f"pad_net/{task}/gate", jnp.mean(gate.astype(jnp.float32)))
    scale = jnp.mean(jnp.abs(own.astype(jnp.float32))) + 1e-12
    distilled = own
    for source in self.heads:
      if source != task:
        message = gate * self.messages[f"{source}_to_{task}"](features[source])
        self.sow("relations", f"pad_net/{task}/{source}",
                 jnp.mean(jnp.abs(message.astype(jnp.float32))) / scale)
        distilled = distilled + message
    output = self.heads[task](distilled, tuple(output_size), train)
    return DeepSupervision(output, (intermediate,), self.intermediate_weight)

  def __call__(self, images, train: bool = False):
    features = self.encode(images, train)
    return {"features": features,
            **{t: self.decode(features, t, images.shape[1:3], train) for t in self.heads}}

  def label_table(self) -> dict:
    """``{top-level name: label}`` (see :func:`mtjax.models.labels.from_table`)."""
    return {**{f"intermediate_{k}": f"{SHARED}/pad_net/{k}" for k in self.heads},
            **{f"gates_{k}": f"{k}/distillation" for k in self.heads},
            **{f"messages_{src}_to_{k}": f"{k}/distillation" for k in self.heads
               for src in self.heads if src != k},
            **{f"intermediate_heads_{k}": f"{k}/intermediate" for k in self.heads},
            **labels.heads_table(self.heads)}

  def param_label(self, path) -> str:
    """``"shared/stem"``, ``"shared/stage<i>"``, ``"shared/pad_net/<t>"`` (encoder);
    ``"<k>/distillation"`` (its gate and incoming messages), ``"<k>/intermediate"``,
    ``"<k>"`` (final head)."""
    return labels.from_table(self.label_table(), path, "PAD-Net",
                             trunk=("backbone", self.backbone))


def build_pad_net(backbone: str, tasks: Mapping, common: Common, *,
                  intermediate_weight: float = 1.0) -> PADNet:
  """``pad_net``: ``intermediate_weight`` (default 1.0, the paper's plain sum): the weight of
  the intermediate predictions' losses in each task's loss."""
  trunk, heads, compute_dtype = backbone_and_heads(backbone, tasks, common)
  if not isinstance(intermediate_weight, (int, float)) or intermediate_weight < 0:
    raise ValueError(f"model.intermediate_weight: got {intermediate_weight!r}; expected a "
                     "float >= 0")
  intermediate_heads = {name: task.head(hidden=common.head_hidden, dtype=compute_dtype)
                        for name, task in tasks.items()}
  return PADNet(trunk, heads, intermediate_heads, float(intermediate_weight))


# ---------------------------------------------------------------------------------------------
# ltb: learning to branch


def gumbel_softmax_st(key, logits, temperature: float):
  """A straight-through Gumbel-softmax sample over the last axis (Jang et al., 2017, Eq. 1;
  Guo et al., 2020, Eq. 5): one-hot forward, the gradient of the soft sample backward."""
  gumbel = jax.random.gumbel(key, logits.shape, logits.dtype)
  soft = jax.nn.softmax((logits + gumbel) / temperature, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return hard + soft - jax.lax.stop_gradient(soft)


class LearnToBranch(nn.Module):
  """Learning to Branch (Guo, Lee & Ulbricht, ICML 2020), Eqs. (3)–(5), as LibMTL's ``LTB``.

  A super-graph of ``T`` nodes per layer: layer 0 is ``T`` stems on the image, layer ``i`` is
  ``T`` copies of stage ``i``. Node ``t`` of layer ``i`` reads ``Σ_s z^i_{ts} x^{i-1}_s`` where
  ``z^i_t`` is a straight-through Gumbel-softmax sample of its learned parent logits
  ``θ^i_t`` (:func:`gumbel_softmax_st`, temperature ``temperature``): in training, one parent
  per node per step, the tree learned by the gradient through the soft sample; in evaluation
  the most likely parent (``argmax θ``): the learned tree. Task ``t``'s head reads node ``t`` of
  the last layer. The noise comes from the ``"gumbel"`` PRNG stream: the train step passes
  ``fold_in(per-step key, MODEL_KEY_TAG)``; a training pass without that stream (the inner
  passes of meta-level methods) uses the noise-free ``softmax(θ / temperature)``.
  Deviations: constant temperature and no warm-up (LibMTL: all parents summed for the first
  1% of epochs, τ decaying with the epoch; the paper anneals τ too) and no retraining of the
  derived tree: its weights are the super-graph's. Logits start at 0 (every parent equally
  likely).

  No shared encoder: every node can feed every task, so nodes and logits are labelled
  ``"shared"`` (the general path); the representation level is refused.
  Relations: ``"ltb/stage<i>"``, the ``(T, T)`` branching probabilities ``softmax(θ^i)``
  (row ``t``: node ``t``'s parent distribution).
  Parameters: ``T · P_backbone + N · T² + Σ_t P_head_t``.
  """

  plan: backbones.Plan
  heads: Mapping[str, nn.Module]
  temperature: float

  def setup(self):
    stages = _stage_names(self.plan)
    self.nodes = {f"{t}_{s}": backbones.Stages(self.plan, i, i) for t in self.heads
                  for i, s in enumerate(["stem", *stages])}
    num_tasks = len(self.heads)
    self.branching = [self.param(f"branch_stage{i}", nn.initializers.zeros,
                                 (num_tasks, num_tasks)) for i in range(1, len(stages) + 1)]

  def _choice(self, logits, train: bool):
    if not train:
      return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
    if self.has_rng("gumbel"):
      return gumbel_softmax_st(self.make_rng("gumbel"), logits, self.temperature)
    return jax.nn.softmax(logits / self.temperature, axis=-1)

  def __call__(self, images, train: bool = False):
    tasks = tuple(self.heads)
    xs = [self.nodes[f"{t}_stem"](images, train) for t in tasks]
    for i in range(1, len(self.plan.stages) + 1):
      logits = self.branching[i - 1]
      self.sow("relations", f"ltb/stage{i}", jax.nn.softmax(logits, axis=-1))
      xs = _mix(self._choice(logits, train), xs)
      xs = [self.nodes[f"{t}_stage{i}"](x, train) for t, x in zip(tasks, xs, strict=True)]
    features = dict(zip(tasks, xs, strict=True))
    return {"features": features,
            **{t: self.heads[t](features[t], images.shape[1:3], train) for t in tasks}}

  def label_table(self) -> dict:
    """``{top-level name: label}`` (see :func:`mtjax.models.labels.from_table`)."""
    stages = _stage_names(self.plan)
    return {**{f"nodes_{t}_{p}": f"{SHARED}/{t}/{p}" for t in self.heads
               for p in ["stem", *stages]},
            **{f"branch_stage{i}": f"{SHARED}/branching" for i in range(1, len(stages) + 1)},
            **labels.heads_table(self.heads)}

  def param_label(self, path) -> str:
    """``"shared/<t>/stem"``, ``"shared/<t>/stage<i>"`` (node ``t``), ``"shared/branching"``
    (the logits), ``"<task>"`` (head)."""
    return labels.from_table(self.label_table(), path, "learning-to-branch")


def build_ltb(backbone: str, tasks: Mapping, common: Common, *,
              temperature: float = 1.0) -> LearnToBranch:
  """``ltb``: ``temperature`` (default 1.0, the Gumbel-softmax's τ; constant, see the class)."""
  trunk, heads, _ = backbone_and_heads(backbone, tasks, common)
  if not isinstance(temperature, (int, float)) or not temperature > 0:
    raise ValueError(f"model.temperature: got {temperature!r}; expected a float > 0")
  return LearnToBranch(backbones.plan_of(trunk), heads, float(temperature))
