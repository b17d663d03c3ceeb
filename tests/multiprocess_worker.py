"""One process of the 2-process x 4-device test (run by test_multiprocess.py).

argv: process_id num_processes port out.npz validation.jsonl
"""
import os
import sys

pid, nproc, port, out, validation_log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)

import numpy as np  # noqa: E402

from dro_jax import models, optim, sharding, train_state  # noqa: E402
from tiny import random_batch, tiny_config  # noqa: E402

mesh_config = sharding.MeshConfig(data=4, model=2)
mesh = sharding.create_mesh(mesh_config)
rules = sharding.logical_axis_rules(mesh_config)
model = models.DROModel(tiny_config(vocab_size=384), tau=1.0)  # byte tokens, for the evaluation
txs, scheds = {}, {}
for k in ("policy", "value"):
    txs[k], scheds[k] = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=1), 10)
batches = [random_batch(seed=s, batch=8, reward_kind="scalar") for s in range(3)]
shapes = {k: v.shape for k, v in batches[0].items()}


def from_host_arrays(params):
    """Start from host (numpy) arrays, the same on every process, as from a checkpoint: each
    process builds only its devices' shards of them."""
    rng = np.random.default_rng(7)
    draw = lambda path, x: (np.ones(x.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
                            else (0.1 * rng.normal(size=x.shape)).astype(np.float32))
    return jax.tree_util.tree_map_with_path(draw, params)


state, state_sh = train_state.create_state(model, txs, shapes, mesh, rules, with_ref=True,
                                           params_override=from_host_arrays)
step = train_state.jit_train_step(train_state.make_train_step(model, txs, scheds), state_sh, mesh)
losses = []
per_host = 8 // nproc
with sharding.use_mesh(mesh):
    for b in batches:
        local = {k: v[pid * per_host:(pid + 1) * per_host] for k, v in b.items()}  # this host's shard
        state, metrics = step(state, sharding.host_batch_to_global(local, mesh))
        losses.append(float(metrics["loss/total"]))
# The step loop's signal check: one process's flag reaches every process, one poll later.
from dro_jax import trainer  # noqa: E402

agreement = trainer._LaggedAgreement(mesh)
seen = [agreement.poll(pid == nproc - 1 and i == 1) for i in range(4)]
assert seen == ([False, False, True, False] if nproc > 1 else [False, True, False, False]), seen
# After the loop (a Ctrl-C in the last step), one process's flag stops every process alike.
assert trainer._all_hosts_agree(pid == nproc - 1) and not trainer._all_hosts_agree(False)
# Train-eval on a held-out split of 13 records: each host reads its seqio shard (7 and 6 here)
# and the shorter one pads with empty batches, so both run the same programs.
import seqio  # noqa: E402

from dro_jax import validation  # noqa: E402
from dro_jax.data import converters, tasks  # noqa: E402

tasks.register_feedback_task("multiprocess_eval", paths={"train": validation_log, "validation": validation_log},
                             vocabulary=seqio.ByteVocabulary())
evaluator = validation.Evaluator(
    model=model, task_name="multiprocess_eval", feature_lengths={"inputs": 12, "targets": 10}, batch_size=8,
    converter=converters.DROFeatureConverter(pack=False), reference="frozen", mesh=mesh, state_sharding=state_sh,
    config=validation.EvalConfig(period=1))
with sharding.use_mesh(mesh):
    evaluation = {f"eval/{k}": v for k, v in evaluator(state).items()}
assert evaluator.examples == 13 and evaluation["eval/examples"] == 13, (evaluator.examples, evaluation)
# gather parameters to every host for the comparison
from jax.experimental import multihost_utils  # noqa: E402

params = multihost_utils.process_allgather(state.params, tiled=True)
if pid == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out, losses=np.array(losses), **flat, **evaluation)
if nproc > 1:
    # A SIGTERM that reaches one host only, during the last step, under a caller's own handler
    # (the demo's): every host saves, then every host's handler stops it (none waits forever in
    # a collective the others never reach).
    import signal  # noqa: E402

    from dro_jax import io_utils  # noqa: E402

    real, calls = trainer.make_dataset, []

    def dataset_with_a_sigterm(*a, **kw):
        for batch in real(*a, **kw):
            calls.append(1)
            if pid == 1 and len(calls) == 3:  # the probe's batch, then steps 1-2
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    trainer.make_dataset = dataset_with_a_sigterm
    run = os.path.join(os.path.dirname(out), "run")
    stopped = None
    with io_utils.sigterm_interrupts():
        try:
            trainer.train(model_dir=run, model=model, task_name="multiprocess_eval",
                          task_feature_lengths={"inputs": 12, "targets": 10}, batch_size=8, train_steps=2,
                          log_every=1, mesh_config=mesh_config, dropout=False,
                          policy_optimizer=optim.OptimizerConfig(warmup_steps=0),
                          value_optimizer=optim.OptimizerConfig(warmup_steps=0),
                          checkpoint_config=trainer.CheckpointConfig(save_every_steps=100))
        except KeyboardInterrupt as e:
            stopped = str(e)
    assert stopped == "SIGTERM", (pid, stopped)
    assert os.path.isdir(os.path.join(run, "checkpoints", "2")), os.listdir(os.path.join(run, "checkpoints"))
print("ok", pid, losses, flush=True)
