"""The paper's whole training chain as one config: multimodal pretraining (8K packed) -> long-context
continual training (32K; the paper adds long video and documents) -> long-CoT SFT -> RL (RLCS + GRPO), each stage starting from the
previous stage's checkpoint, with a held-out evaluation after SFT and after RL.

    python -m experiments.run --config=experiments/configs/pipeline.py                 # GLM-4.1V-9B sizes
    python -m experiments.run --config=experiments/configs/pipeline.py:model=glm45v,mesh=fsdp2_ep4
    python -m experiments.run --config=experiments/configs/pipeline.py:runlocal        # tiny, on a laptop

Every stage is its own config file's `get_config(arg)` with the same variants, so `model=`, `mesh=`,
`rules=` and `runlocal` reach every stage; an explicit `mesh=` variant wins over a stage's own default
mesh (long_context's sequence axis). experiments/run.py's `run_pipeline` validates every stage before
the first one compiles, sets each stage's `train.init_from` to the previous stage's work directory
(`<workdir>/<i>_<stage>`), reruns resume, and `eval_after` names the stages followed by an evaluation.
"""
import ml_collections

from experiments.configs import base, long_context, pretrain, rl, sft

STAGE_MODULES = (pretrain, long_context, sft, rl)     # the order of the chain
DEFAULT_MODEL = "glm41v_9b"      # without `model=` or `runlocal`: the paper's GLM-4.1V-9B


def get_config(arg=None):
    variants = base.parse_variants(arg)
    if "model" not in variants and "runlocal" not in variants:
        arg = ",".join(filter(None, [arg, f"model={DEFAULT_MODEL}"]))
    stages = [module.get_config(arg) for module in STAGE_MODULES]
    if "mesh" in variants:
        for stage in stages:
            stage.mesh.ici = dict(base.MESHES[variants["mesh"]])
    by_name = {stage.stage: stage for stage in stages}
    # SFT is evaluated too: it gets RL's held-out evaluation block (same answer style and budgets).
    by_name["sft"].eval = ml_collections.ConfigDict(by_name["rl"].eval.to_dict())
    c = ml_collections.ConfigDict()
    c.stages = stages
    c.eval_after = ["sft", "rl"]
    c.report = True
    validate_pipeline(c)
    return c


def validate_pipeline(c) -> None:
    """Every stage's own validation, plus what chaining needs: the same model preset, HF checkpoint and
    model overrides in every stage (each stage restores the previous stage's params), and no stage but the
    first carrying its own `train.init_from` (run_pipeline fills it in)."""
    if not c.stages:
        raise ValueError("a pipeline config needs at least one stage")
    for stage in c.stages:
        base.validate(stage)
    first = c.stages[0]
    for stage in c.stages[1:]:
        for key in ("preset", "hf_checkpoint", "param_dtype"):
            if stage.model.get(key) != first.model.get(key):
                raise ValueError(f"stage {stage.stage!r} has model.{key}={stage.model.get(key)!r} but stage "
                                 f"{first.stage!r} has {first.model.get(key)!r}: chained stages share one model")
        for key in ("vision", "text"):
            if dict(stage.model.get(key) or {}) != dict(first.model.get(key) or {}):
                raise ValueError(f"stage {stage.stage!r} overrides model.{key} differently from {first.stage!r}")
        if stage.data.get("vocab_size", 512) != first.data.get("vocab_size", 512):
            raise ValueError(f"stage {stage.stage!r} uses data.vocab_size={stage.data.get('vocab_size')} but "
                             f"{first.stage!r} uses {first.data.get('vocab_size')}: the vocabulary must not change")
        if stage.train.init_from:
            raise ValueError(f"stage {stage.stage!r} sets train.init_from={stage.train.init_from!r}; in a pipeline "
                             f"it starts from the previous stage's checkpoint")
    names = [stage.stage for stage in c.stages]
    unknown = sorted(set(c.get("eval_after", ())) - set(names))
    if unknown:
        raise ValueError(f"eval_after names {unknown}, which are not stages of this pipeline {names}")
    for stage in c.stages:
        if stage.stage in c.get("eval_after", ()) and "eval" not in stage:
            raise ValueError(f"stage {stage.stage!r} is in eval_after but has no `eval` block")
