"""Writes docs/hyperparameters.md: every hyperparameter of every registered weighting method, its
default (read from the registry, ``mtjax.weighting.hparams``), its unit and where the value
comes from. ``SOURCES`` is the one hand-written part;
``tests/weighting/test_hyperparameters_doc.py`` checks that the page lists every method and
hyperparameter with the registry's default.

    PYTHONPATH=. python3 experiments/hyperparameters.py   # rewrites docs/hyperparameters.md
"""

import os

from mtjax import weighting

LIBMTL = "LibMTL `LibMTL/config.py`"
OWN = "mtjax's own (no reference value)"
SOLVER = "mtjax's solver setting (the reference solves exactly: cvxpy/SLSQP/quadprog)"

# method -> (paper, {hparam: (unit, source)})
SOURCES = {
    "aligned_mtl": ("Senushkin et al., CVPR 2023", {
        "scale_mode": ("—", "paper, authors' code (SamsungLabs/MTL) and LibMTL "
                            "`Aligned_MTL.py`: the smallest singular value")}),
    "auto_lambda": ("Liu, Johns & Davison, TMLR 2022, Eq. 3", {
        "weight_init": ("—", "authors' code (lorenmt/auto-lambda `trainer_dense.py`)"),
        "meta_lr": ("Adam rate", "authors' code (lorenmt/auto-lambda)"),
        "primary_tasks": ("task indices", "paper Sec. 3 (None: all tasks, multi-task setting)")}),
    "cagrad": ("Liu et al., NeurIPS 2021, Eq. 7 / Alg. 1", {
        "c": ("—", "authors' code (Cranial-XIX/CAGrad, NYUv2 `run.sh`: 0.4); LibMTL `calpha` "
                   "0.5"),
        "rescale": ("—", f"{LIBMTL} (`rescale` 1), authors' code"),
        "num_iters": ("solver iterations", SOLVER),
        "norm_eps": ("fraction of ‖J‖_F", "torchjd `CAGradWeighting` (1e-4), raised to the "
                                         "float32 floor of a Gram-based ‖g_w‖")}),
    "con_fig": ("Liu et al., ICLR 2025 (ConFIG)", {}),
    "db_mtl": ("Lin et al., 2023 (DB-MTL)", {
        "beta": ("EMA factor per step", f"{LIBMTL} `DB_beta`"),
        "beta_sigma": ("exponent of the step", f"{LIBMTL} `DB_beta_sigma`")}),
    "dualproj": ("Quinton & Rey, 2024; Lopez-Paz & Ranzato 2017, Eq. 11", {
        "pref_vector": ("per task", "torchjd `DualProj` (None: uniform)"),
        "norm_eps": ("absolute (trace)", "torchjd `DualProj`"),
        "reg_eps": ("ridge on G / tr G", "torchjd `DualProj`"),
        "num_iters": ("solver iterations", SOLVER)}),
    "dwa": ("Liu, Johns & Davison, CVPR 2019, Eq. 1", {
        "temperature": ("—", f"paper (T = 2), {LIBMTL} `T`"),
        "period": ("steps per loss record", "mtjax: 1 step (the paper and LibMTL average over "
                                            "an epoch: set the steps per epoch)")}),
    "ew": ("equal weighting", {}),
    "excess_mtl": ("He et al., ICML 2024, Alg. 1", {
        "robust_step_size": ("step size η", "authors' code (yifei-he/ExcessMTL `config.py`), "
                                            f"{LIBMTL} `robust_step_size`")}),
    "fairgrad": ("Ban & Ji, ICML 2024", {
        "alpha": ("—", "authors' code (OptMN-Lab/fairgrad, every `run.sh`: 2.0; trainer flag "
                       f"1.0); {LIBMTL} `FairGrad_alpha` 1.0"),
        "max_norm": ("gradient norm", "authors' code (`clip_grad_norm_`)"),
        "num_iters": ("solver iterations", SOLVER),
        "ridge": ("on G / ‖G‖", OWN)}),
    "famo": ("Liu et al., NeurIPS 2023", {
        "w_lr": ("Adam rate", f"authors' code (Cranial-XIX/FAMO), {LIBMTL} `FAMO_w_lr`"),
        "gamma": ("weight decay", f"{LIBMTL} `FAMO_w_gamma` (authors' `famo.py`: 0.01)")}),
    "fixed": ("fixed weights", {
        "weights": ("per task", "None: all ones (EW)")}),
    "forum": ("Ye et al., ECAI 2024", {
        "outer_lr": ("Adam rate", f"{LIBMTL} `outer_lr`"),
        "inner_lr": ("SGD rate", f"{LIBMTL} `inner_lr`"),
        "inner_steps": ("virtual SGD steps", f"{LIBMTL} `inner_step`"),
        "phi": ("—", f"{LIBMTL} `FORUM_phi`"),
        "ema_period": ("steps per EMA index", "mtjax: 1 (LibMTL indexes β by the epoch: set "
                                              "the steps per epoch)"),
        "num_iters": ("solver iterations", SOLVER)}),
    "gls": ("Chennupati et al., CVPRW 2019 (geometric loss)", {
        "eps": ("loss floor", OWN)}),
    "go4align": ("Shen et al., NeurIPS 2024", {
        "num_groups": ("groups", "authors' code (default 1: EW with an adaptive scale on the "
                                 "default experiment)"),
        "robust_step_size": ("step size", "authors' code")}),
    "graddrop": ("Chen et al., NeurIPS 2020", {
        "leak": ("one or per task, [0, 1]", f"{LIBMTL} `leak`")}),
    "gradnorm": ("Chen et al., ICML 2018", {
        "alpha": ("—", f"paper (NYUv2 setting), {LIBMTL} `alpha`"),
        "lr": ("Adam rate of the weights", "AuxiLearn/Nash-MTL code (LibMTL trains the weights "
                                           "with the model's optimizer)")}),
    "gradvac": ("Wang et al., ICLR 2021", {
        "beta": ("EMA factor per step", f"{LIBMTL} `GradVac_beta`"),
        "ema_on_adjust_only": ("—", "LibMTL `GradVac.py` (False: the EMA moves every step)")}),
    "igb": ("Dai, Fei & Lu, 2023, Sec. 4.2 (IGBv2)", {
        "steps_per_epoch": ("steps", "mtjax: 1 (set the epoch length for the authors' "
                                     "schedule)"),
        "base_epoch": ("epochs", "authors' code `--base_epoch 1`"),
        "start_epoch": ("epochs", "authors' code (5)"),
        "update_after": ("epochs", "authors' code"),
        "update_every": ("steps (calls)", "authors' code (50)"),
        "buffer_size": ("transitions", "authors' code (SAC)"),
        "sac_lr": ("Adam rate", "authors' code (SAC)"),
        "batch_size": ("transitions", "authors' code (SAC)"),
        "hidden": ("units", "authors' code (SAC)"),
        "discount": ("—", "authors' code (SAC)"),
        "tau": ("—", "authors' code (SAC)"),
        "init_alpha": ("—", "authors' code (SAC, adaptive, target entropy −T)"),
        "reward_scale": ("—", "authors' code (SAC)"),
        "seed": ("—", OWN)}),
    "igb_v1": ("Dai, Fei & Lu, 2023 (IGBv1)", {
        "warmup_steps": ("steps", "authors' code counts epochs (`--base_epoch 1`): set "
                                  "E steps per epoch"),
        "base_steps": ("steps", "authors' code counts epochs: set E")}),
    "imtl": ("Liu et al., ICLR 2021 (IMTL-G)", {}),
    "mgda": ("Sener & Koltun, NeurIPS 2018, Eq. 3", {
        "normalization": ("—", f"{LIBMTL} `mgda_gn` ('none'), Nash-MTL's MGDA"),
        "num_iters": ("solver iterations", SOLVER)}),
    "moco": ("Fernando et al., ICLR 2023", {
        "beta": ("step size", f"{LIBMTL} `MoCo_beta`"),
        "beta_sigma": ("decay exponent", f"{LIBMTL} `MoCo_beta_sigma`"),
        "gamma": ("step size", f"{LIBMTL} `MoCo_gamma`"),
        "gamma_sigma": ("decay exponent", f"{LIBMTL} `MoCo_gamma_sigma`"),
        "rho": ("regulariser", f"{LIBMTL} `MoCo_rho`"),
        "normalize": ("—", "LibMTL `MoCo.py`"),
        "lambda_update": ("—", "paper (projection); LibMTL `MoCo.py` uses softmax")}),
    "modo": ("Chen et al., NeurIPS 2023", {
        "gamma": ("step size of λ", f"{LIBMTL} `MoDo_gamma` — degenerate on the default "
                                   "experiment: λ stays at (1/3, 1/3, 1/3) ± 0.01 after 300 "
                                   "steps (EW's row)"),
        "rho": ("regulariser", f"{LIBMTL} `MoDo_rho`"),
        "double_sampling": ("—", "paper (two independent samples)")}),
    "moml": ("Ye et al., NeurIPS 2021", {
        "outer_lr": ("Adam rate", f"{LIBMTL} `outer_lr`"),
        "inner_lr": ("SGD rate", f"{LIBMTL} `inner_lr`"),
        "normalization": ("—", "LibMTL `Trainer.bacth_forward_MOML` (l2)"),
        "num_iters": ("solver iterations", SOLVER)}),
    "nash_mtl": ("Navon et al., ICML 2022, Eq. 4", {
        "max_norm": ("gradient norm", f"authors' code (AvivNavon/nash-mtl), {LIBMTL}"),
        "update_weights_every": ("steps", "authors' code and LibMTL count steps (1)"),
        "optim_niter": ("Newton steps (authors: CCP steps)", f"authors' code, {LIBMTL}"),
        "ridge": ("on G / ‖G‖_F", OWN)}),
    "pcgrad": ("Yu et al., NeurIPS 2020", {}),
    "rlw": ("Lin et al., TMLR 2022 (random loss weighting)", {}),
    "sdmgrad": ("Xiao et al., NeurIPS 2023", {
        "lamda": ("—", f"authors' code (OptMN-Lab/sdmgrad `run.sh`), {LIBMTL} `SDMGrad_lamda`"),
        "max_norm": ("gradient norm", "authors' code (`clip_grad_norm_`)"),
        "num_iters": ("solver iterations", f"{SOLVER}; {LIBMTL} `SDMGrad_niter` 20")}),
    "stch": ("Lin et al., ICML 2024 (smooth Tchebycheff)", {
        "mu": ("—", "authors' code (Xi-L/STCH `--STCH_mu`), LibMTL `STCH_mu`"),
        "warmup_steps": ("steps", "authors' code warms up 4 epochs (`--STCH_warmup_epoch 4`): "
                                  "set 4 E for E steps per epoch; mtjax default 0"),
        "nadir_steps": ("steps", "authors' code averages the 5th epoch: set E; mtjax default 1"),
        "pref_vector": ("per task", "authors' code (None: all ones)")}),
    "upgrad": ("Quinton & Rey, 2024, Eq. 5 / Prop. 1", {
        "pref_vector": ("per task", "torchjd `UPGrad` (None: uniform)"),
        "norm_eps": ("absolute (trace)", f"torchjd `UPGrad`, {LIBMTL} `UPGrad_norm_eps`"),
        "reg_eps": ("ridge on G / tr G", f"torchjd `UPGrad`, {LIBMTL} `UPGrad_reg_eps`"),
        "num_iters": ("solver iterations", SOLVER)}),
    "uw": ("Kendall, Gal & Cipolla, CVPR 2018, Eq. 7", {
        "lr": ("Adam rate", "Nash-MTL/FAMO code `--method-params-lr`"),
        "init_log_var": ("log σ²", "LibMTL `UW.py` (−0.5)")}),
    "weight_net": ("**mtjax's own** method (in the spirit of Meta-Weight-Net, Shu et al. 2019)",
                   {"hidden": ("units", OWN), "meta_lr": ("Adam rate", OWN),
                    "average_decay": ("EMA factor per step", OWN),
                    "primary_tasks": ("task indices", "None: all tasks"),
                    "seed": ("—", OWN)}),
}

HEADER = """# Hyperparameters of the weighting methods

Every hyperparameter of every registered method (`mtjax.weighting.names()`), its default
(`mtjax.weighting.hparams(name)`), its unit and where the value comes from: the paper, the
authors' code, or LibMTL's `LibMTL/config.py` (GitHub HEAD 4336804). Each method's docstring
cites the same source. Generated by `experiments/hyperparameters.py` from the registry;
`tests/weighting/test_hyperparameters_doc.py` fails when a method or hyperparameter is missing
here or its default differs.

**Epochs and steps.** A weighting method sees calls (train steps), not epochs. Where the authors
count epochs, mtjax counts steps and names the mapping: `dwa.period`, `forum.ema_period`,
`igb.steps_per_epoch` (the other `igb` counts are then epochs, as the authors'), `igb_v1`'s and
`stch`'s windows (`stch`: the authors warm up 4 epochs and average the 5th: `warmup_steps = 4 E`,
`nadir_steps = E` for `E` steps per epoch). Nash-MTL's `update_weights_every` counts steps in the
authors' code too. The defaults of 1 step make those windows one call on the default experiment.

**Degenerate defaults on the default experiment** (`experiments/configs/shapes.py`, 300 steps):
`modo`'s γ = 1e-3 (LibMTL's) leaves λ at uniform, so its row is EW's; `go4align` with its
official one group is EW with an adaptive scale. Both rows say so in
`experiments/results/shapes_sweep_300steps_new_methods.md`.

`weight_net` is **mtjax's own** method: no paper or library defines it, its defaults are this
library's choice.

| method | hyperparameter | default | unit | source of the default |
|---|---|---|---|---|
"""


def _fmt(value):
  return f"`{value!r}`"


def table() -> str:
  lines = [HEADER.rstrip("\n")]
  for name in weighting.names():
    paper, rows = SOURCES[name]
    hparams = weighting.hparams(name)
    if not hparams:
      lines.append(f"| `{name}` | — | — | — | {paper}; no hyperparameters |")
    for key, default in hparams.items():
      unit, source = rows[key]
      lines.append(f"| `{name}` | `{key}` | {_fmt(default)} | {unit} | {paper}; {source} |")
  return "\n".join(lines) + "\n"


def main():
  path = os.path.join(os.path.dirname(__file__), "..", "docs", "hyperparameters.md")
  with open(path, "w") as f:
    f.write(table())


if __name__ == "__main__":
  main()
