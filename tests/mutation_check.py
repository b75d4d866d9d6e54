"""Mutation check: the test suite must fail when any of these bugs is introduced.

Each mutation edits one line of a copy of the memengine package (the compiled extension is
copied along), then runs the named tests against that copy; a mutation the tests do not catch is
reported as SURVIVED and the script exits non-zero. The working tree is never modified.

    python tests/mutation_check.py            # all mutations
    python tests/mutation_check.py -k loss    # those whose name contains "loss"

Not part of the pytest run (it starts a pytest per mutation); run it after changing the code
the mutations touch.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (file in memengine/, text to replace (must occur exactly once), replacement, tests to run)
MUTATIONS = {
    "unscale forgets the loss scale": (
        "engine/engine.py",
        "scale = 1.0 / (tokens_total * self.loss_scale)",
        "scale = 1.0 / tokens_total",
        ["tests/engine"],
    ),
    "dynamic loss scale never grows": (
        "engine/engine.py",
        "self.loss_scale *= 2",
        "self.loss_scale *= 1",
        ["tests/engine"],
    ),
    "Engine.step skips finish_window": (
        "engine/engine.py",
        "self.buffer.finish_window()",
        "pass",
        ["tests/engine", "tests/differential"],
    ),
    "MasterOptimizer steps parameters that got no gradient": (
        "grad/master_optimizer.py",
        "master.grad = p.main_grad if self.buffer.received_gradient(p) else None",
        "master.grad = p.main_grad",
        ["tests/engine", "tests/grad"],
    ),
    "the fold hook's view branch does not claim": (
        "grad/hooks.py",
        "        buffer.claim(p)\n        buffer.contributed(p)\n        return",
        "        buffer.contributed(p)\n        return",
        ["tests/grad", "tests/differential"],
    ),
    "no autocast replay in me.checkpoint": (
        "segments/checkpoint.py",
        "stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))",
        "pass",
        ["tests/segments/test_checkpoint.py", "tests/segments/test_checkpoint_torch_behaviours.py"],
    ),
    "the replayed RNG leaks to the caller": (
        "segments/checkpoint.py",
        "stack.enter_context(torch.random.fork_rng(devices=devices))",
        "pass",
        ["tests/segments/test_checkpoint.py", "tests/segments/test_checkpoint_torch_behaviours.py"],
    ),
    "a parameter some rank used is stepped only if two ranks did": (
        "distributed/data_parallel.py",
        "if count > 0 and not self.buffer.received_gradient(p):",
        "if count > 1 and not self.buffer.received_gradient(p):",
        ["tests/distributed/test_agreement.py"],
    ),
    "the reducer launches a bucket without closing its window": (
        "distributed/reducer.py",
        "self.buffer.finish_window(bucket.params)  # no gradient here in this step: contribute zeros",
        "pass",
        ["tests/distributed/test_agreement.py"],
    ),
    "a failing rank does not complete its step's collectives": (
        "distributed/data_parallel.py",
        "self.reducer.abandon(launched)",
        "raise error",
        ["tests/distributed/test_agreement.py"],
    ),
    "ZeRO-1 squares shard norms in float32": (
        "ops/functions.py",
        "norm = stats[0].to(torch.float64)",
        "norm = stats[0]",
        ["tests/engine/test_silent_failures.py", "tests/distributed/test_agreement.py"],
    ),
    "a zero-token step scales by 1/0": (
        "engine/engine.py",
        "scale = torch.where(has_tokens, scale, torch.ones_like(scale)).to(torch.float32)",
        "scale = scale.to(torch.float32)",
        ["tests/engine/test_silent_failures.py"],
    ),
    "masters do not follow changed weights": (
        "grad/master_optimizer.py",
        "        if changed:\n            self.refresh_masters(changed)",
        "        if False:\n            self.refresh_masters(changed)",
        ["tests/engine/test_silent_failures.py"],
    ),
    "a multi-use low-precision parameter is summed in its own dtype": (
        "grad/buffer.py",
        "p.grad_dtype = torch.float32",
        "p.grad_dtype = None",
        ["tests/grad/test_multi_use_parameters.py"],
    ),
    "a budget's plan is not made again for a longer batch": (
        "engine/engine.py",
        "if self.memory_plan is not None and covers(self._planned_signature, signature):",
        "if self.memory_plan is not None:",
        ["tests/engine/test_step_budget.py"],
    ),
    "a memory-model term dropped (backward temporaries)": (
        "segments/model.py",
        "backward = saved[i] + out[i] + backward_extra[i]",
        "backward = saved[i] + out[i]",
        ["tests/segments/test_plan.py", "tests/segments/test_plan_prediction.py"],
    ),
}


def run(name, mutation, python):
    relative, old, new, tests = mutation
    with tempfile.TemporaryDirectory(prefix="memengine-mutant-") as directory:
        package = pathlib.Path(directory) / "memengine"
        shutil.copytree(ROOT / "memengine", package, ignore=shutil.ignore_patterns("__pycache__"))
        target = package / relative
        text = target.read_text()
        if text.count(old) != 1:
            return f"NOT APPLIED ({old!r} occurs {text.count(old)} times in memengine/{relative})"
        target.write_text(text.replace(old, new))
        environment = dict(os.environ, PYTHONPATH=directory + os.pathsep + os.environ.get("PYTHONPATH", ""))
        check = subprocess.run(
            [python, "-P", "-c", "import memengine; print(memengine.__file__)"],
            capture_output=True,
            text=True,
            env=environment,
            cwd=ROOT,
        )
        if not check.stdout.startswith(directory):
            return f"NOT APPLIED (the mutant did not import: {check.stdout.strip()} {check.stderr.strip()[-300:]})"
        # -P: no current directory at the front of sys.path, so the mutant (on PYTHONPATH) is imported
        # rather than the working tree's memengine.
        result = subprocess.run(
            [python, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            capture_output=True,
            text=True,
            env=environment,
            cwd=ROOT,
        )
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
        return ("caught" if result.returncode != 0 else "SURVIVED") + f" ({summary})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="run the mutations whose name contains this text")
    args = parser.parse_args()
    outcomes = {}
    for name, mutation in MUTATIONS.items():
        if args.k in name:
            outcomes[name] = run(name, mutation, sys.executable)
            print(f"{name}: {outcomes[name]}", flush=True)
    survived = [name for name, outcome in outcomes.items() if not outcome.startswith("caught")]
    print(f"\n{len(outcomes) - len(survived)} of {len(outcomes)} mutations caught")
    raise SystemExit(1 if survived else 0)


if __name__ == "__main__":
    main()
