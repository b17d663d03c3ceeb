"""2 processes x 4 CPU devices joined by jax.distributed equal 1 process x 8 devices: training
steps, and the train-eval over a split the two hosts share unevenly."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.path.dirname(HERE))
    env.pop("XLA_FLAGS", None)
    return env


def test_two_processes_match_one(tmp_path):
    log = tmp_path / "validation.jsonl"
    rng = np.random.default_rng(3)
    log.write_text("".join(json.dumps({"prompt": f"q{i} " * int(rng.integers(1, 4)), "response": f"a{i}",
                                       "label": bool(i % 3)}) + "\n" for i in range(13)))
    single = tmp_path / "single.npz"
    proc = subprocess.run([sys.executable, WORKER, "0", "1", "0", str(single), str(log)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = tmp_path / "multi.npz"
    for attempt in range(2):  # the free port can be taken before the coordinator binds it
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", port, str(multi), str(log)], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        if not any(p.returncode and "in use" in err.lower() for p, (_, err) in zip(procs, outs)):
            break
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = np.load(single), np.load(multi)
    assert set(a.files) == set(b.files) and len(a.files) > 5
    assert {"eval/loss/dro", "eval/logratio/mean"} <= set(a.files) and abs(float(a["eval/logratio/mean"])) > 1e-3
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-4)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
