"""The demo loop: SFT reference -> feedback log -> ref log-probs -> DRO-V / KTO / filtered SFT -> evaluation."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import numpy as np

from dro_jax.demo import env as env_lib

METHODS = ("dro_v", "kto", "filtered_sft")
LABELS = {"reference": "reference (SFT)", "dro_v": "DRO-V", "kto": "KTO", "filtered_sft": "filtered SFT"}


@dataclasses.dataclass
class DemoConfig:
    """Everything the demo does; the defaults are the full demo (about 80 s on 2 CPU cores, with
    the compilation cache warm)."""

    seed: int = 0
    # environment
    follow_prob: float = 0.1
    label_noise: float = 0.1
    # data sizes
    n_sft: int = 2000          # demonstrations for the reference
    n_log: int = 2000          # feedback-log size (one response per prompt)
    n_eval: int = 512          # held-out prompts
    # network (T5 v1.1 layout, byte vocabulary)
    d_model: int = 64
    d_ff: int = 128
    num_heads: int = 4
    d_kv: int = 16
    num_layers: int = 2
    inputs_length: int = 16
    targets_length: int = 12
    # reference SFT
    sft_steps: int = 500
    sft_learning_rate: float = 3e-3
    # the methods (same budget each)
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-4
    value_learning_rate: float = 3e-4
    warmup_steps: int = 20
    tau: float = 0.5          # the paper's ablation range is 0.1-5; 1 is its default
    kto_beta: float = 0.1
    eval_every: int = 100
    temperature: float = 1.0   # sampling for the log and for evaluation
    rounds: int = 1            # > 1: iterated DRO-V (fresh log from the improved policy each round)
    methods: tuple = METHODS

    @classmethod
    def reduced(cls, **kw) -> "DemoConfig":
        """The test suite's fast variant."""
        base = dict(n_sft=1500, n_log=1024, n_eval=256, sft_steps=300, steps=150, eval_every=75)
        base.update(kw)
        return cls(**base)

    def environment(self) -> env_lib.Environment:
        return env_lib.Environment(follow_prob=self.follow_prob, label_noise=self.label_noise)

    def t5_config(self):
        from dro_jax import network

        return network.T5Config(
            vocab_size=259, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff, num_heads=self.num_heads,
            num_encoder_layers=self.num_layers, num_decoder_layers=self.num_layers,
            relative_attention_num_buckets=16, relative_attention_max_distance=32)


class Progress:
    """Stage messages with elapsed time."""

    def __init__(self):
        self.t0 = time.time()
        self.last = ""  # the last stage, for a stop message

    def __call__(self, msg: str) -> None:
        self.last = " ".join(msg.split())
        print(f"[demo {self.elapsed():6.1f}s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.time() - self.t0


class TrainingStopped(RuntimeError):
    """A training run ended before its last step (a first Ctrl-C: the trainer saves and returns;
    a SIGTERM reaches the demo's own handler after the save instead, see trainer.train)."""


def draw_prompts(cfg: DemoConfig, env: env_lib.Environment | None = None) -> tuple[list, list, list]:
    """The SFT, log and held-out prompts; held-out ones are distinct from the other two."""
    env = env or cfg.environment()
    sft = env.prompts(cfg.n_sft, seed=cfg.seed * 1000 + 1)
    log = env.prompts(cfg.n_log, seed=cfg.seed * 1000 + 2)
    held = env.prompts(cfg.n_eval, seed=cfg.seed * 1000 + 3, exclude=set(sft) | set(log))
    return sft, log, held


def prompt_limits(cfg: DemoConfig) -> tuple[int, int]:
    """(the largest n_log at cfg.n_eval, the largest n_eval at cfg.n_log) that `draw_prompts` can
    supply. The held-out draw excludes the SFT and log prompts (which may overlap), so the limit
    depends on the seed; the log prompts for n_log are the first n_log of a longer draw. (When
    n_sft + n_log + n_eval <= env.max_draw() the sizes fit whatever the overlap.)"""
    env = cfg.environment()
    limit = env.max_draw()
    used = set(env.prompts(min(cfg.n_sft, limit), seed=cfg.seed * 1000 + 1))
    max_log = -1 if cfg.n_eval + len(used) > limit else None
    max_eval = None
    for k, p in enumerate(env.prompts(limit, seed=cfg.seed * 1000 + 2), 1):
        used.add(p)
        if max_log is None and cfg.n_eval + len(used) > limit:
            max_log = k - 1
        if k == cfg.n_log:
            max_eval = limit - len(used)
    if max_log is None:
        max_log = limit
    if max_eval is None:  # n_log > limit: no draw of that size
        max_eval = limit - len(used)
    return max(max_log, 0), max(max_eval, 0)


def _run_steps(run_dir: str) -> list[int]:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


class Demo:
    def __init__(self, config: DemoConfig, out_dir: str, quiet_training: bool = False):
        self.cfg = config
        self.out = os.path.abspath(out_dir)
        self.env = config.environment()
        self.say = Progress()
        self.quiet = quiet_training
        self.results: dict[str, Any] = {"methods": {}, "curves": {}, "rounds": []}

    # ---- helpers -----------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def _train(self, name: str, model, task: str, steps: int, lr: float, init: str | None,
               save_every: int, schedule: str = "constant") -> str:
        from dro_jax import checkpoints, optim, sharding, trainer

        cfg = self.cfg
        run_dir = self.path(name)
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # a demo run always starts afresh
        opt = optim.OptimizerConfig(name="adamw", learning_rate=lr, warmup_steps=cfg.warmup_steps, schedule=schedule)
        vopt = optim.OptimizerConfig(name="adamw", learning_rate=cfg.value_learning_rate,
                                     warmup_steps=cfg.warmup_steps)
        t0 = time.time()
        trainer.train(
            model_dir=run_dir, model=model, task_name=task,
            task_feature_lengths={"inputs": cfg.inputs_length, "targets": cfg.targets_length},
            batch_size=cfg.batch_size, train_steps=steps, policy_optimizer=opt, value_optimizer=vopt,
            mesh_config=sharding.MeshConfig(data=-1, model=1),
            checkpoint_config=trainer.CheckpointConfig(save_every_steps=save_every, keep=1000, async_save=False),
            data=trainer.DataConfig(seed=cfg.seed), initial_checkpoint_path=init, seed=cfg.seed,
            log_every=max(1, min(50, steps // 4)), dropout=False)
        # A first Ctrl-C makes the trainer save where it is and return normally: the rest of the
        # demo would then report a short run as the full one.
        latest = checkpoints.latest_step_dir(run_dir)
        reached = int(os.path.basename(latest)) if latest else 0
        if reached != steps:
            raise TrainingStopped(f"training {name} stopped at step {reached} of {steps} (Ctrl-C?); "
                                  "nothing is reported")
        self.say(f"trained {name}: {steps} steps in {time.time() - t0:.1f}s")
        return run_dir

    def _policy(self, run_dir: str, step: int | None = None):
        from dro_jax.data import tasks as data_tasks
        from dro_jax.infer import Policy
        from dro_jax import checkpoints

        path = run_dir if step is None else os.path.join(run_dir, "checkpoints", str(step))
        ckpt = checkpoints.load_model_checkpoint(path)
        return Policy(ckpt.config, ckpt.params, data_tasks.get_vocabulary(ckpt.vocabulary_path or "byte"),
                      value_params=ckpt.value_params)

    def _register(self, name: str, path: str, standardize: bool):
        import seqio

        from dro_jax.data import rewards, tasks as data_tasks

        data_tasks.register_feedback_task(
            name, paths=path, vocabulary=seqio.ByteVocabulary(),
            reward_mapping=rewards.RewardMapping(standardize=standardize), overwrite=True)
        return name

    def _sample_log(self, policy, prompts: list[str], path: str, seed: int) -> dict[str, float]:
        """Samples one response per prompt, lets the rater label it, writes a feedback log."""
        cfg = self.cfg
        # max_length leaves room for the EOS the log's tokenisation appends: nothing is truncated
        responses = policy.sample(prompts, inputs_length=cfg.inputs_length, max_length=cfg.targets_length - 1,
                                  temperature=cfg.temperature, batch_size=128, seed=seed, progress=False)
        labels = self.env.rate(prompts, responses, np.random.default_rng(seed))
        truth = [self.env.follows_rule(p, r) for p, r in zip(prompts, responses)]
        env_lib.write_jsonl(path, ({"prompt": p, "response": r, "label": bool(l)}
                                   for p, r, l in zip(prompts, responses, labels)))
        return {"n": len(prompts), "labelled_thumbs_up": float(np.mean(labels)), "true_thumbs_up": float(np.mean(truth))}

    def _evaluate(self, policy, reference) -> dict[str, Any]:
        from dro_jax import evaluate

        cfg = self.cfg
        return evaluate.reward_metrics(policy, self.eval_prompts, self.env.reward, reference=reference,
                                       **self.sampling())

    def sampling(self) -> dict[str, Any]:
        """How the evaluation samples (recorded in results.json; `dro_jax.evaluate` flags of these
        names reproduce it: the samples depend on the batch size too)."""
        cfg = self.cfg
        return dict(temperature=cfg.temperature, inputs_length=cfg.inputs_length, max_length=cfg.targets_length,
                    batch_size=128, seed=cfg.seed * 1000 + 21)

    def _heldout(self, policy, tau: float | None = None) -> dict[str, Any]:
        from dro_jax import evaluate

        cfg = self.cfg
        h = self.heldout
        m = evaluate.log_metrics(policy, h["prompts"], h["responses"], h["rewards"], h["labels"],
                                 ref_logprobs=h["ref_logprobs"], tau=tau or cfg.tau,
                                 inputs_length=cfg.inputs_length, targets_length=cfg.targets_length, batch_size=128)
        return {"heldout_dro_loss": m["dro_loss"], "heldout_value_source": m["value_source"],
                "heldout_implied_reward_auc": m["implied_reward_auc"]}

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.prepare()
        for i, method in enumerate(self.cfg.methods):
            self.train_method(method, i)
        if self.cfg.rounds > 1 and "dro_v" in self.cfg.methods:
            self._iterate()
        self.results["config"] = dataclasses.asdict(self.cfg)
        self.results["config"]["methods"] = list(self.cfg.methods)
        self.results["environment"] = dataclasses.asdict(self.env)
        self.results["evaluation_sampling"] = self.sampling()
        self.results["wall_time_s"] = self.say.elapsed()
        return self.results

    def prepare(self) -> None:
        """Steps 1-3: the SFT reference, the labelled log, reference log-probs (and its evaluation)."""
        from dro_jax import checkpoints, models, score

        cfg, env, say = self.cfg, self.env, self.say
        os.makedirs(self.out, exist_ok=True)
        self.t5 = t5 = cfg.t5_config()
        say(f"environment: '<shout|ask|say>: <word>', the user wants the word + '!'/'?'/'.'; "
            f"demonstrator follows it {cfg.follow_prob:.0%} of the time, label noise {cfg.label_noise:.0%}")
        sft_prompts, log_prompts, self.eval_prompts = draw_prompts(cfg, env)
        env_lib.write_jsonl(self.path("data", "eval_prompts.jsonl"), ({"prompt": p} for p in self.eval_prompts))

        # 1. reference by SFT on imperfect demonstrations
        rng = np.random.default_rng(cfg.seed)
        demos = self.path("data", "demonstrations.jsonl")
        env_lib.write_jsonl(demos, ({"prompt": p, "response": env.demonstration(p, rng), "label": True}
                                    for p in sft_prompts))
        say(f"1/5 SFT reference on {cfg.n_sft} demonstrations ({cfg.sft_steps} steps)")
        task = self._register("dro_demo_sft", demos, standardize=False)
        self.ref_dir = self._train("reference", models.FilteredSFTModel(t5, min_reward=0.0), task, cfg.sft_steps,
                                   cfg.sft_learning_rate, None, cfg.sft_steps, schedule="linear_decay")
        self.reference = reference = self._policy(self.ref_dir)
        # Methods start from an exported policy-only checkpoint: the trainer then initialises
        # DRO-V's value network from the policy encoder (the run directory of an SFT run holds an
        # empty value tree, which the trainer's initial-checkpoint check rejects).
        self.ref_init = self.path("reference_model")
        if os.path.isdir(self.ref_init):
            shutil.rmtree(self.ref_init)
        checkpoints.save_model_checkpoint(self.ref_init, config=reference.config, params=reference.params,
                                          vocabulary_path=checkpoints.BYTE_VOCABULARY)

        # 2. the feedback log, sampled from the reference and labelled by the hidden rater
        say(f"2/5 sampling a {cfg.n_log}-response log from the reference; the user labels it")
        raw_log = self.path("data", "log_round1.jsonl")
        log_stats = self._sample_log(reference, log_prompts, raw_log, seed=cfg.seed * 1000 + 11)
        say(f"    log: {log_stats['labelled_thumbs_up']:.1%} thumbs up as labelled "
            f"({log_stats['true_thumbs_up']:.1%} truly follow the rule)")
        self.results["log"] = self.log_stats = log_stats
        # held-out log (for the held-out DRO loss): reference samples on the eval prompts
        held_path = self.path("data", "heldout_log.jsonl")
        self._sample_log(reference, self.eval_prompts, held_path, seed=cfg.seed * 1000 + 12)

        # 3. reference log-probs
        say("3/5 scoring reference log-probs (dro_jax.score)")
        scored = self.path("data", "log_round1_scored.jsonl")
        score.score_log(checkpoint=self.ref_dir, inputs=[raw_log], output=scored, inputs_length=cfg.inputs_length,
                        targets_length=cfg.targets_length, batch_size=128, progress=False,
                        overwrite=True)  # a rerun into the same --output replaces its own files
        self.log_task = self._register("dro_demo_log_round1", scored, standardize=True)
        self._load_heldout(held_path, self.log_task)

        ref_eval = self._evaluate(reference, reference)
        ref_eval.update(self._heldout(reference))
        ref_eval["kl_to_reference"] = 0.0
        self.results["methods"]["reference"] = self.ref_eval = ref_eval
        say(f"    reference: thumbs-up {ref_eval['thumbs_up_rate']:.1%} on {cfg.n_eval} held-out prompts")

    def make_model(self, method: str, **kw):
        from dro_jax import models

        cfg = self.cfg
        if method == "dro_v":
            return models.DROModel(self.t5, tau=kw.get("tau", cfg.tau), value_kind="separate")
        if method == "kto":
            return models.KTOModel(self.t5, beta=kw.get("beta", cfg.kto_beta),
                                   desirable_weight=self._kto_desirable_weight())
        if method == "filtered_sft":
            return models.FilteredSFTModel(self.t5, min_reward=0.0)
        raise ValueError(f"unknown method {method!r}")

    def _kto_desirable_weight(self) -> float:
        """The KTO paper's advice: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]; we use 1."""
        up = self.log_stats["labelled_thumbs_up"]
        return float(np.clip((1.0 - up) / max(up, 1e-6), 1.0, 10.0))

    def train_method(self, method: str, i: int = 0, name: str | None = None, **kw) -> dict[str, Any]:
        """Steps 4-5 for one method: train on the log, evaluate at every saved checkpoint."""
        cfg, say = self.cfg, self.say
        name = name or method
        say(f"4/5 training {LABELS[method]} ({i + 1}/{len(cfg.methods)}) on the log, {cfg.steps} steps")
        run_dir = self._train(name, self.make_model(method, **kw), self.log_task, cfg.steps,
                              kw.get("lr", cfg.learning_rate), self.ref_init, cfg.eval_every)
        say(f"5/5 evaluating {LABELS[method]} at steps {_run_steps(run_dir)}")
        ref_eval = self.ref_eval
        curve = [{"step": 0, "thumbs_up_rate": ref_eval["thumbs_up_rate"], "kl_to_reference": 0.0,
                  "thumbs_up_ci95": ref_eval["thumbs_up_ci95"]}]
        final = None
        for step in _run_steps(run_dir):
            policy = self._policy(run_dir, step)
            m = self._evaluate(policy, self.reference)
            curve.append({"step": step, **{k: m[k] for k in ("thumbs_up_rate", "kl_to_reference", "thumbs_up_ci95")}})
            say(f"    {LABELS[method]} step {step}: thumbs-up {m['thumbs_up_rate']:.1%} "
                f"(95% CI {m['thumbs_up_ci95'][0]:.1%}-{m['thumbs_up_ci95'][1]:.1%}), KL {m['kl_to_reference']:.2f}")
            final = (policy, m)
        policy, m = final
        m.update(self._heldout(policy, kw.get("tau")))
        m["train_steps"] = cfg.steps
        self.results["methods"][name] = m
        self.results["curves"][name] = curve
        if name == "dro_v":
            self.results["rounds"].append(self._round_entry(1, self.log_stats, m))
        return m

    def _round_entry(self, r: int, log_stats: dict, m: dict) -> dict:
        return {"round": r, "log_true_thumbs_up": log_stats["true_thumbs_up"],
                "log_labelled_thumbs_up": log_stats["labelled_thumbs_up"],
                "thumbs_up_rate": m["thumbs_up_rate"], "thumbs_up_ci95": m["thumbs_up_ci95"],
                "kl_to_reference": m["kl_to_reference"], "n_eval": m["n_eval"]}

    def _load_heldout(self, path: str, task: str) -> None:
        """The held-out log, with reference log-probs (same tokenisation as dro_jax.score's)."""
        from dro_jax.data import logs, tasks as data_tasks
        from dro_jax.infer import tokenize

        cfg = self.cfg
        recs = logs.load_feedback_log(path)
        stats = data_tasks.get_reward_stats(task)  # the training log's standardisation
        prompts, responses = [r.prompt for r in recs], [r.response for r in recs]
        enc, _ = tokenize(self.reference.vocabulary, prompts, cfg.inputs_length)
        tgt, _ = tokenize(self.reference.vocabulary, responses, cfg.targets_length)
        ref = self.reference.logprobs(enc, tgt, batch_size=128, target_mask=(tgt > 0).astype(np.int32))
        self.heldout = {
            "prompts": prompts, "responses": responses,
            "rewards": stats.standardize(np.array([r.reward for r in recs])),
            "labels": np.array([bool(r.label) for r in recs]),
            "ref_logprobs": ref.astype(np.float64),
        }

    def _iterate(self) -> None:
        from dro_jax import models, score

        cfg, say = self.cfg, self.say
        prev_dir = self.path("dro_v")
        seen = set(self.eval_prompts)
        for r in range(2, cfg.rounds + 1):
            say(f"round {r}/{cfg.rounds}: fresh log from the round-{r - 1} DRO-V policy")
            prompts = self.env.prompts(cfg.n_log, seed=cfg.seed * 1000 + 100 + r, exclude=seen)
            behaviour = self._policy(prev_dir)
            raw = self.path("data", f"log_round{r}.jsonl")
            stats = self._sample_log(behaviour, prompts, raw, seed=cfg.seed * 1000 + 100 + r)
            say(f"    log: {stats['labelled_thumbs_up']:.1%} thumbs up as labelled "
                f"({stats['true_thumbs_up']:.1%} truly)")
            scored = self.path("data", f"log_round{r}_scored.jsonl")
            # the previous round's policy is this round's reference (and initialisation)
            score.score_log(checkpoint=prev_dir, inputs=[raw], output=scored, inputs_length=cfg.inputs_length,
                            targets_length=cfg.targets_length, batch_size=128, progress=False,
                            overwrite=True)
            task = self._register(f"dro_demo_log_round{r}", scored, standardize=True)
            run_dir = self._train(f"dro_v_round{r}", models.DROModel(self.t5, tau=cfg.tau), task, cfg.steps,
                                  cfg.learning_rate, prev_dir, cfg.steps)
            policy = self._policy(run_dir)
            m = self._evaluate(policy, self.reference)
            entry = self._round_entry(r, stats, m)
            say(f"    round {r}: thumbs-up {m['thumbs_up_rate']:.1%} KL to the SFT reference "
                f"{m['kl_to_reference']:.2f}")
            self.results["rounds"].append(entry)
            prev_dir = run_dir
