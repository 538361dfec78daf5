"""Optimizers and learning-rate schedules from the config."""

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def make_schedule(cfg, num_steps: int):
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(cfg.learning_rate, max(num_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                            max(num_steps, cfg.warmup_steps + 1))


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """``cfg``: name, learning_rate, schedule, warmup_steps, momentum, weight_decay, grad_clip."""
  schedule = make_schedule(cfg, num_steps)
  if cfg.name == "sgd":
    opt = optax.sgd(schedule, momentum=cfg.momentum or None)
    if cfg.weight_decay:
      opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  elif cfg.name == "adam":
    opt = optax.adam(schedule)
    if cfg.weight_decay:
      opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  else:
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  if cfg.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt
