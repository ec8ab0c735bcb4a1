#!/usr/bin/env python
"""Run one benchmark protocol (see benchmarks/protocols.py), resumably and in pieces.

    python benchmarks/run_benchmark.py --protocol digits8 --jobs 2 --max_hours 2.3   # one piece; run again to continue
    python benchmarks/run_benchmark.py --protocol digits8 --methods uniform    # never runs stage 1
    python benchmarks/run_benchmark.py --protocol fmnist16 --dry_run          # print the plan, run nothing
    python benchmarks/report.py                                                # BENCHMARKS.md from the results

Per protocol:

1. Stage 1 (only if a pending run needs a rater): ``train_noiserater.py`` meta-trains one rater per
   ``--weighting_scope`` (``batch``, ``candidates``) with the protocol's *stage-1* inner UNet, into
   ``benchmarks/runs/raters/<key>/`` where the key hashes everything that determines the rater; protocols with
   equal keys share it (``transfer`` reuses ``digits8``'s). Its cost is written to
   ``results/<protocol>/rater_<scope>.json``.
2. Stage 2: for each seed (seed-major, so a partial benchmark has every method at the seeds done so far) and
   method, ``train_diffusion_hard.py`` with the same ``--seed`` and the same ``--num_candidate_noises`` for
   every method (common random numbers: the candidate pools align), resuming from its last checkpoint.
3. Evaluation: the validation curve and final validation loss come from the run's ``validation.jsonl`` /
   ``final_metrics.json``; FD-EffLite0 (when the protocol has FD) of ``num_generated`` DDIM samples vs
   ``num_real`` real images that no run trained on, at the protocol's fractions of training. The real-vs-real
   floor (two disjoint real halves) is written once to ``results/<protocol>/fd_floor.json``.

A finished run writes ``results/<protocol>/run_<method>_seed<k>.json`` and is skipped afterwards. Each training
run's output goes to ``<runs_dir>/logs/<run>.log`` (default runs dir: ``benchmarks/runs/<protocol>``). ``--jobs 2`` runs two trainings at once (one thread
each on 2 cores): stage 1's two scopes together, then stage-2 runs in plan order.
``--max_hours`` bounds one invocation: a job whose estimated time (from the runs already finished) does not fit
is not started, and a job still running at the deadline is stopped (it resumes from its last checkpoint next
time). Commit ``benchmarks/results/`` after each piece.
"""

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from protocols import (DEFAULT_LR_SCHEDULER, METHODS, PROTOCOLS, ProtocolError, fd_off_protocol,  # noqa: E402
                       fd_step, get_protocol, seeds_for, stage1_key)

# Keys that only select a subset of a protocol's runs, or only describe it; any other difference means a
# different protocol.
SELECTION_KEYS = ("seeds", "methods", "method_seeds", "description", "fd_note")
BUDGET_MARGIN_S = 60.0


class UsageError(Exception):
    """Bad command-line input; printed as one ``error:`` line, exit 2."""


class BudgetExhausted(Exception):
    """The invocation's time budget is spent; the benchmark continues at the next invocation."""


# ---- command execution ------------------------------------------------------------------------------------


def run_command(cmd, log_path, timeout_s=None, env=None):
    """Run ``cmd`` (list) from the repository root, appending its output to ``log_path``.

    ``env``: extra environment variables (dict of str) on top of this process's environment. Returns the exit
    status. On ``timeout_s`` the whole process group gets SIGTERM (SIGKILL 30 s later) and
    ``subprocess.TimeoutExpired`` is raised; checkpoints are written atomically, so the run resumes from its
    last complete checkpoint next time.
    """
    with open(log_path, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        full_env = {**os.environ, **env} if env else None
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=full_env)
        try:
            return p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            raise


def launcher():
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


# Models are built in this process by the FD evaluations of several runs at once (--jobs). diffusers'
# ``from_pretrained`` builds a model inside context managers that patch torch globally: ``no_init_weights``
# (torch.nn.init) and, when ``low_cpu_mem_usage`` is on (its default), accelerate's ``init_empty_weights``
# (``nn.Module.register_parameter``). The latter restores whatever it found on entry, so two threads that enter and
# leave it interleaved leave the patch installed for good: every later model gets meta parameters ("Cannot copy out
# of meta tensor"), which stopped two Min-SNR runs of fmnist16_cosine that finished in the same second. Hence
# ``low_cpu_mem_usage=False`` (no register_parameter patch) and one lock around every model construction here.
MODEL_BUILD_LOCK = threading.Lock()


def load_pipeline_threadsafe(pipeline_cls, path):
    """``pipeline_cls.from_pretrained(path)`` safe to call from several threads at once (see MODEL_BUILD_LOCK)."""
    with MODEL_BUILD_LOCK:
        return pipeline_cls.from_pretrained(path, low_cpu_mem_usage=False)


# ---- commands (pure) ---------------------------------------------------------------------------------------


def stage1_command(p, scope, out_dir, unet_config_path):
    """Stage-1 command (list) meta-training the rater of ``scope`` for protocol ``p``."""
    s = p["stage1"]
    return [*launcher(), "train_noiserater.py",
            "--dataset_name", p["dataset_name"], "--resolution", str(p["resolution"]), "--report_to", "none",
            "--model_config_name_or_path", unet_config_path, "--train_batch_size", str(s["train_batch_size"]),
            "--output_dir", out_dir, "--seed", str(s["seed"]), "--max_train_steps", str(s["meta_steps"]),
            "--population_size", str(s["population_size"]), "--inner_steps", str(s["inner_steps"]),
            "--inner_lr", str(s["inner_lr"]), "--inner_model_lifetime", str(s["inner_model_lifetime"]),
            "--compare_every", str(s["compare_every"]), "--checkpointing_steps", str(s["checkpointing_steps"]),
            "--weighting_scope", scope, "--num_candidate_noises", str(p["num_candidate_noises"]),
            "--resume_from_checkpoint", "latest"]


def stage2_command(p, method, seed, out_dir, unet_config_path, rater_dir=None):
    """Stage-2 command (list). Seed and pool size are the same for every method of ``p`` (common random numbers)."""
    if METHODS[method]["rater_scope"] is not None and rater_dir is None:
        raise ValueError(f"method {method!r} needs a rater directory")
    cmd = [*launcher(), "train_diffusion_hard.py",
           "--dataset_name", p["dataset_name"], "--resolution", str(p["resolution"]), "--report_to", "none",
           "--model_config_name_or_path", unet_config_path, "--train_batch_size", str(p["batch_size"]),
           "--output_dir", out_dir, "--seed", str(seed), "--max_train_steps", str(p["steps"]),
           "--learning_rate", str(p["learning_rate"]), "--lr_scheduler", p.get("lr_scheduler", DEFAULT_LR_SCHEDULER),
           "--lr_warmup_steps", str(p["lr_warmup_steps"]), "--validation_steps", str(p["validation_steps"]),
           "--num_validation_triples", str(p["num_validation_triples"]),
           "--validation_seed", str(p["validation_seed"]), "--checkpointing_steps", str(p["checkpointing_steps"]),
           "--num_inference_steps", "10", "--resume_from_checkpoint", "latest",
           "--num_candidate_noises", str(p["num_candidate_noises"]), *METHODS[method]["flags"]]
    if METHODS[method]["rater_scope"] is not None:
        cmd += ["--rater_model_name_or_path", rater_dir]
    return cmd


def plan(p):
    """Pending-or-not stage-2 jobs ``(seed, method)``, seed-major in the protocol's method order."""
    seeds = sorted({s for m in p["methods"] for s in seeds_for(p, m)})
    return [(s, m) for s in seeds for m in p["methods"] if s in seeds_for(p, m)]


def protocol_signature(p):
    """The protocol without the keys that only select runs: two result sets are comparable iff these agree."""
    return {k: v for k, v in p.items() if k not in SELECTION_KEYS}


# ---- small file helpers ------------------------------------------------------------------------------------


def write_json(path, obj):
    """Write ``obj`` atomically; the temporary name is unique per process and thread, so that concurrent writers
    of one file (two runs of one invocation, or two invocations) never move each other's temporary file."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def weights_sha256(rater_dir):
    """sha256 (hex) of the rater's weights file ``diffusion_pytorch_model.safetensors`` in ``rater_dir``, or None
    when the folder has none. Recorded with stage 1 and with every run that used the rater, so that a rater
    recomputed under the same cache key (for instance on another machine, whose floating-point kernels can give
    other weights) is told apart from the one earlier runs used."""
    path = os.path.join(rater_dir, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rater_record(new, old):
    """The ``rater_<scope>.json`` record to write: ``new`` (this computation), keeping ``old``'s first date and
    machine when both describe the same weights, else moving ``old`` into ``earlier_computations`` (its weights
    hash, date, machine, cost and stage-1 summary). Records without a hash (written before hashes were kept) count
    as the same weights when their stage-1 summaries agree apart from wall time."""
    if not old or old.get("key") != new.get("key"):
        return new
    rec = dict(new, earlier_computations=list(old.get("earlier_computations", [])))

    def summary(r):
        return {k: v for k, v in (r.get("meta_summary") or {}).items() if k != "wall_time_s"}
    same = (old.get("weights_sha256") == new.get("weights_sha256") if old.get("weights_sha256")
            else summary(old) == summary(new))
    if same:
        rec["date"], rec["machine"] = old.get("date", rec.get("date")), old.get("machine", rec.get("machine"))
    else:
        rec["earlier_computations"].append({k: old.get(k) for k in ("weights_sha256", "date", "machine", "cost_s",
                                                                    "meta_summary")})
    if not rec["earlier_computations"]:
        del rec["earlier_computations"]
    return rec


def add_seconds(path, key, seconds):
    """Accumulate launcher seconds under ``key`` in the JSON file ``path`` (work spread over pieces)."""
    d = read_json(path) if os.path.exists(path) else {}
    d[key] = d.get(key, 0.0) + seconds
    write_json(path, d)
    return d[key]


# ---- the benchmark -----------------------------------------------------------------------------------------


class Benchmark:
    """One protocol's runs. ``run_command`` is injectable (tests use a fake that writes the scripts' outputs).

    ``jobs``: training runs executed at once (stage 1's two scopes, then stage-2 runs, in plan order); each run
    gets ``threads_per_job`` torch/OpenMP threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``; None leaves the
    environment as it is). On 2 CPU cores, ``jobs=2, threads_per_job=1`` does about twice the work of one job
    with two threads: the small UNets do not use two threads well.
    """

    def __init__(self, protocol, results_dir, runs_dir, raters_dir, *, run_command=run_command, deadline=None,
                 clock=time.time, command_line="", evaluate_fd=None, log=print, jobs=1, threads_per_job=None):
        if jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {jobs}")
        if threads_per_job is not None and threads_per_job < 1:
            raise UsageError(f"--threads_per_job must be >= 1, got {threads_per_job}")
        self.p = protocol
        self.results_dir, self.runs_dir, self.raters_dir = results_dir, runs_dir, raters_dir
        self.run_command, self.deadline, self.clock, self.log = run_command, deadline, clock, log
        self.command_line = command_line
        self.evaluate_fd = evaluate_fd if evaluate_fd is not None else self._evaluate_fd
        self.jobs, self.threads_per_job = jobs, threads_per_job
        self.stage1_runs = []  # scopes meta-trained by this invocation (for tests and the log)
        self.logs_dir = os.path.join(runs_dir, "logs")
        self.times_path = os.path.join(runs_dir, "launcher_seconds.json")
        self._lock = threading.Lock()  # guards the read-modify-write of the seconds files
        self._fd_lock = threading.Lock()
        self._rater_locks = {}  # scope -> lock: one stage-1 check/training per scope, also under --jobs 2
        self._reference_s = {}  # thread id -> seconds spent computing the FD reference

    def log_path(self, name):
        """Output of one training run: ``<runs_dir>/logs/<name>.log``."""
        return os.path.join(self.logs_dir, f"{name}.log")

    # -- paths
    def result_path(self, method, seed):
        return os.path.join(self.results_dir, f"run_{method}_seed{seed}.json")

    def run_dir(self, method, seed):
        return os.path.join(self.runs_dir, f"{method}_seed{seed}")

    def rater_dir(self, scope):
        return os.path.join(self.raters_dir, stage1_key(self.p, scope))

    def pending(self):
        return [(s, m) for s, m in plan(self.p) if not os.path.exists(self.result_path(m, s))]

    # -- setup
    def check_results_dir(self):
        """Refuse to mix results of different protocols in one folder (names the first differing key)."""
        path = os.path.join(self.results_dir, "protocol.json")
        if not os.path.exists(path):
            return
        old = read_json(path).get("signature", {})
        new = json.loads(json.dumps(protocol_signature(self.p)))
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                raise UsageError(f"{path}: results there were produced with a different protocol ({k}: "
                                 f"{old.get(k)!r} there, {new.get(k)!r} now); use another --results_dir")

    def write_setup(self):
        from protocols import unet_num_parameters

        self.unet_config_path = os.path.join(self.runs_dir, "unet_config.json")
        self.stage1_unet_config_path = os.path.join(self.runs_dir, "stage1_unet_config.json")
        write_json(self.unet_config_path, self.p["unet"])
        write_json(self.stage1_unet_config_path, self.p["stage1_unet"])
        info = {"protocol": self.p["name"], "signature": protocol_signature(self.p), "resolved": self.p,
                "unet_params": unet_num_parameters(self.p["unet"], self.p["resolution"], self.p["num_channels"]),
                "stage1_unet_params": unet_num_parameters(self.p["stage1_unet"], self.p["resolution"],
                                                          self.p["num_channels"]),
                "fd_off_protocol": fd_off_protocol(self.p),
                "command": self.command_line, "machine": machine_description(self.threads_per_job), "date": time.strftime("%Y-%m-%d")}
        path = os.path.join(self.results_dir, "protocol.json")
        if os.path.exists(path):  # keep the first machine/date; record every command used
            old = read_json(path)
            info["commands"] = sorted(set(old.get("commands", [old.get("command")])) | {self.command_line})
            info["machine"], info["date"] = old.get("machine", info["machine"]), old.get("date", info["date"])
        else:
            info["commands"] = [self.command_line]
        write_json(path, info)
        self.info = info

    # -- budget
    def remaining_s(self):
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def estimate_s(self, method, seed):
        """Seconds still needed by a stage-2 job: finished runs of the same method (else of any method), scaled
        by the fraction of steps its last checkpoint has not done yet. None without any finished run."""
        times = {}
        for s2, m2 in plan(self.p):
            path = self.result_path(m2, s2)
            if os.path.exists(path):
                r = read_json(path)
                times.setdefault(m2, []).append(r.get("launcher_s", 0.0) + r.get("eval_s", 0.0))
        pool = times.get(method) or [t for ts in times.values() for t in ts]
        if not pool:
            return None
        return max(pool) * (1.0 - self.done_fraction(self.run_dir(method, seed)))

    def done_fraction(self, out):
        from noise_rater.checkpointing import checkpoint_step, resolve_checkpoint

        if os.path.exists(os.path.join(out, "final_metrics.json")):
            return 1.0
        try:
            ckpt = resolve_checkpoint(out, "latest", check_hashes=False) if os.path.isdir(out) else None
        except Exception:  # an unreadable checkpoint: the script decides what to do with it
            ckpt = None
        return min(1.0, checkpoint_step(ckpt) / self.p["steps"]) if ckpt else 0.0

    def launch(self, cmd, what, log_name, seconds_file, seconds_key, estimate_s=None):
        """Run ``cmd`` within the budget, adding the launcher seconds it took (also when it failed or was
        stopped) to ``seconds_key`` of the JSON file ``seconds_file``. Raises BudgetExhausted when it cannot run
        or is stopped at the deadline, RuntimeError when it fails."""
        left = self.remaining_s() - BUDGET_MARGIN_S
        if left <= 0 or (estimate_s is not None and estimate_s > left):
            raise BudgetExhausted(f"{what} needs ~{estimate_s or 0:.0f} s, {max(left, 0):.0f} s left")
        log_path = self.log_path(log_name)
        os.makedirs(self.logs_dir, exist_ok=True)
        env = ({"OMP_NUM_THREADS": str(self.threads_per_job), "MKL_NUM_THREADS": str(self.threads_per_job)}
               if self.threads_per_job else None)
        t0 = self.clock()
        try:
            rc = self.run_command(cmd, log_path, None if self.deadline is None else left, **({"env": env} if env else {}))
        except subprocess.TimeoutExpired:
            raise BudgetExhausted(f"{what} stopped at the deadline (resumes from its last checkpoint)") from None
        finally:
            with self._lock:
                add_seconds(seconds_file, seconds_key, self.clock() - t0)
        if rc != 0:
            raise RuntimeError(f"{what} failed (exit {rc}); see {log_path}:\n{' '.join(cmd)}")

    # -- stage 1
    def ensure_rater(self, scope):
        """The rater directory for ``scope``, meta-training it first if the cache lacks it (one caller at a time:
        runs of one scope starting together would otherwise both write its result files; the two scopes of
        stage 1 still train at once)."""
        with self._lock:
            lock = self._rater_locks.setdefault(scope, threading.Lock())
        with lock:
            return self._ensure_rater(scope)

    def _ensure_rater(self, scope):
        out = self.rater_dir(scope)
        done = os.path.exists(os.path.join(out, "meta_summary.json"))
        if not done:
            self.log(f"[stage 1] {self.p['name']}: rater, scope {scope} -> {out}")
            os.makedirs(out, exist_ok=True)
            self.launch(stage1_command(self.p, scope, out, self.stage1_unet_config_path), f"stage 1 ({scope})",
                        f"stage1_{scope}", os.path.join(out, "runner_seconds.json"), "launcher_s")
            self.stage1_runs.append(scope)
            if not os.path.exists(os.path.join(out, "meta_summary.json")):
                raise RuntimeError(f"stage 1 finished but wrote no {out}/meta_summary.json")
        summary = read_json(os.path.join(out, "meta_summary.json"))
        for fig in ("rater_analysis.png", "meta_evidence.png", "valuation_accuracy.png"):  # the stage-1 script's own figures, for the report
            if os.path.exists(os.path.join(out, fig)):
                shutil.copyfile(os.path.join(out, fig), os.path.join(self.results_dir, f"rater_{scope}_{fig}"))
        secs = read_json(os.path.join(out, "runner_seconds.json")) if os.path.exists(
            os.path.join(out, "runner_seconds.json")) else {}
        path = os.path.join(self.results_dir, f"rater_{scope}.json")
        new = {
            "scope": scope, "key": stage1_key(self.p, scope), "stage1": self.p["stage1"],
            "stage1_unet": self.p["stage1_unet"], "stage1_unet_params": self.info["stage1_unet_params"],
            "meta_summary": summary, "launcher_s": secs.get("launcher_s"),
            # cost charged to the method: the larger of the script's own clock and the launcher's (all pieces)
            "cost_s": max(v for v in (summary.get("wall_time_s"), secs.get("launcher_s")) if v is not None)
            if (summary.get("wall_time_s") is not None or secs.get("launcher_s") is not None) else None,
            "weights_sha256": weights_sha256(out), "machine": machine_description(self.threads_per_job),
            "date": time.strftime("%Y-%m-%d")}
        write_json(path, rater_record(new, read_json(path) if os.path.exists(path) else None))
        return out

    # -- stage 2
    def run_one(self, method, seed):
        if os.path.exists(self.result_path(method, seed)):  # finished meanwhile by another invocation
            return read_json(self.result_path(method, seed))
        scope = METHODS[method]["rater_scope"]
        rater = self.ensure_rater(scope) if scope else None
        out = self.run_dir(method, seed)
        final_path = os.path.join(out, "final_metrics.json")
        if not os.path.exists(final_path):
            self.log(f"[stage 2] {self.p['name']}: {method} seed {seed}")
            cmd = stage2_command(self.p, method, seed, out, self.unet_config_path, rater)
            self.launch(cmd, f"{method} seed {seed}", f"{method}_seed{seed}", self.times_path, f"{method}_seed{seed}",
                        self.estimate_s(method, seed))
        final = read_json(final_path)
        if final.get("steps") != self.p["steps"]:
            raise RuntimeError(f"{final_path}: {final.get('steps')} steps, the protocol asks {self.p['steps']}; "
                               f"remove {out} to rerun it")
        t0, ref0 = self.clock(), self._thread_reference_s()
        fd = self.evaluate_fd(method, seed, out) if self.p.get("fd") else None
        # the one-time real-image reference (computed by whichever run needs it first) is not this run's cost
        eval_s = self.clock() - t0 - (self._thread_reference_s() - ref0)
        result = collect(self.p, method, seed, out, fd)
        times = read_json(self.times_path) if os.path.exists(self.times_path) else {}
        result["launcher_s"] = times.get(f"{method}_seed{seed}", 0.0)
        result["eval_s"] = eval_s
        result["machine"], result["date"] = machine_description(self.threads_per_job), time.strftime("%Y-%m-%d")
        if scope:
            result["rater"] = {"scope": scope, "key": stage1_key(self.p, scope), "weights_sha256": weights_sha256(rater)}
        write_json(self.result_path(method, seed), result)
        self.log(f"    {method} seed {seed}: final val loss {result['final']['val_loss']:.5f}"
                 + (f", FD {result['fd'][str(self.p['steps'])]['fd_efflite0']:.2f}" if result.get("fd") else ""))
        return result

    def run(self):
        """Run every pending job within the budget. Returns the list of jobs still pending."""
        self.check_results_dir()
        for d in (self.results_dir, self.runs_dir, self.raters_dir):
            os.makedirs(d, exist_ok=True)
        self.write_setup()
        pending = self.pending()
        scopes = sorted({METHODS[m]["rater_scope"] for _, m in pending if METHODS[m]["rater_scope"]})
        try:
            # stage 1 first (its raters are shared by every seed), then stage 2 in plan order (seed-major)
            self._map(self.ensure_rater, [(s,) for s in scopes])
            self._map(self.run_one, [(m, s) for s, m in pending])
        except BudgetExhausted as e:
            self.log(f"budget: {e}; stopping. Run the same command again to continue.")
        left = self.pending()
        self.log(f"{self.p['name']}: {len(plan(self.p)) - len(left)} of {len(plan(self.p))} runs done")
        return left

    def _map(self, fn, arg_tuples):
        """``fn(*args)`` for each tuple, ``self.jobs`` at a time, started in order. After the first failure no
        new call starts (running ones finish); a RuntimeError wins over BudgetExhausted, which is re-raised."""
        if self.jobs == 1:
            for args in arg_tuples:
                fn(*args)
            return
        stop = threading.Event()
        errors = []

        def call(args):
            if stop.is_set():
                return
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the calling thread
                stop.set()
                errors.append(e)

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(call, arg_tuples))
        for e in errors:
            if not isinstance(e, BudgetExhausted):
                raise e
        if errors:
            raise errors[0]

    # -- FD
    def _evaluate_fd(self, method, seed, out):
        """FD-EffLite0 / KID at the protocol's fractions of training (uses noise_rater.evaluation)."""
        import torch
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        from noise_rater.checkpointing import load_module_state
        from noise_rater.evaluation import evaluate_pipeline

        self._limit_torch_threads(torch)
        fd = self.p["fd"]
        ref, _ = self.fd_reference()
        pipe = load_pipeline_threadsafe(DDPMPipeline, out)
        res = {}
        for frac in fd["at_fractions"]:
            step = fd_step(self.p, frac)
            if step == self.p["steps"]:
                p = pipe
            else:
                ckpt = os.path.join(out, f"checkpoint-{step}", "unet.safetensors")
                if not os.path.exists(ckpt):
                    raise RuntimeError(f"{ckpt} is missing: FD at step {step} needs that checkpoint")
                with MODEL_BUILD_LOCK:
                    unet = UNet2DModel.from_config(pipe.unet.config)
                load_module_state(unet, ckpt)
                p = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
            m = evaluate_pipeline(p, ref["images"], num_samples=fd["num_generated"],
                                  num_inference_steps=fd["num_inference_steps"], scheduler=fd["scheduler"],
                                  seed=fd["sample_seed"], fd_method="eigh", batch_size=fd.get("batch_size", 64),
                                  kid_subset_size=min(1000, fd["num_generated"], fd["num_real"]),
                                  real_features={"efflite0": ref["features"]})
            res[str(step)] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
            del p
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return res

    def fd_reference(self):
        """(reference {images, features}, floor dict): real images no run trained on, split into two disjoint
        halves A (the reference of every FD) and B; the floor FD(A, B) is written once to fd_floor.json."""
        with self._fd_lock:  # computed once, also when several runs finish at once (--jobs)
            if getattr(self, "_fd_ref", None) is None:
                t0 = self.clock()
                self._fd_ref = self._fd_reference()
                self._reference_s[threading.get_ident()] = self.clock() - t0  # once per Benchmark
            return self._fd_ref

    def _limit_torch_threads(self, torch):
        """FD runs in this process, beside the training runs: it gets the same --threads_per_job (torch's default,
        all cores, would oversubscribe the cores the training runs use)."""
        if self.threads_per_job:
            torch.set_num_threads(self.threads_per_job)

    def _thread_reference_s(self):
        """Seconds this thread has spent computing the FD reference (kept out of a run's ``eval_s``)."""
        return self._reference_s.get(threading.get_ident(), 0.0)

    def _fd_reference(self):
        import numpy as np
        import torch

        from noise_rater.evaluation import (EfficientNetLite0Features, compute_features, feature_statistics,
                                            frechet_distance)

        self._limit_torch_threads(torch)
        fd = self.p["fd"]
        images, source = real_images_for_fd(self.p)
        n = fd["num_real"]
        if images.shape[0] < 2 * n:
            raise RuntimeError(f"FD needs 2 x {n} real images (reference + floor half); {source} has "
                               f"{images.shape[0]}")
        a, b = images[:n], images[n:2 * n]
        cache = os.path.join(self.runs_dir, f"real_features_efflite0_{n}.npz")
        if os.path.exists(cache):
            z = np.load(cache)
            fa, fb = z["a"], z["b"]
        else:
            ext = EfficientNetLite0Features().to("cuda" if torch.cuda.is_available() else "cpu")
            fa, fb = compute_features(ext, a), compute_features(ext, b)
            np.savez(cache + ".tmp.npz", a=fa, b=fb)
            os.replace(cache + ".tmp.npz", cache)
        floor_path = os.path.join(self.results_dir, "fd_floor.json")
        floor = {"source": source, "num_real_reference": n, "num_generated": fd["num_generated"],
                 "fd_real_vs_real_halves": frechet_distance(*feature_statistics(fa), *feature_statistics(fb),
                                                            method="eigh"),
                 "fd_real_vs_real_at_generated_count": frechet_distance(
                     *feature_statistics(fa), *feature_statistics(fb[:fd["num_generated"]]), method="eigh")}
        write_json(floor_path, floor)
        return {"images": a, "features": fa}, floor


# ---- collection (pure apart from reading the run's files) ---------------------------------------------------


def collect(p, method, seed, out, fd):
    """The result record of one finished stage-2 run (everything the report needs, and nothing measured twice)."""
    from noise_rater.training_utils import read_jsonl

    final = read_json(os.path.join(out, "final_metrics.json"))
    rows = read_jsonl(os.path.join(out, "validation.jsonl"))
    curve = sorted(dict((int(r["step"]), float(r["val_loss"])) for r in rows if "val_loss" in r).items())
    return {
        "protocol": p["name"], "method": method, "seed": seed, "dataset": p["dataset_name"],
        "resolution": p["resolution"], "steps": p["steps"], "num_candidate_noises": p["num_candidate_noises"],
        "val_curve": [list(c) for c in curve],
        "final": {k[len("final_"):]: v for k, v in final.items() if k.startswith("final_val_loss")},
        "s_per_step": final.get("s_per_step"), "select_time_s": final.get("select_time_s"),
        "train_time_s": final.get("train_time_s"), "wall_time_s": final.get("wall_time_s"),
        "skipped_steps": final.get("skipped_steps"), "fd": fd,
    }


def real_images_for_fd(p):
    """Real images no stage-2 run trains on, `(M, C, H, W)` in [-1, 1], and a description of their source.

    Fashion-MNIST: its *test* split (10,000 images; training uses only the training split). Other data:
    not supported (the held-out split changes with the seed), so the protocol must not ask for FD."""
    import torch

    if p["dataset_name"] not in ("fashion_mnist", "fashion-mnist"):
        raise RuntimeError(f"FD reference for {p['dataset_name']!r}: only fashion_mnist has a split that no run "
                           "trains on (its test split); set the protocol's fd to null")
    from noise_rater.data import fashion_mnist_dir

    path = os.path.join(fashion_mnist_dir(), "t10k-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        raise RuntimeError(f"{path} not found (apt-get install dataset-fashion-mnist)")
    x = torch.from_numpy(read_idx_images(path)).float()[:, None]
    r = p["resolution"]
    if x.shape[-1] != r:  # as noise_rater.data: bilinear, antialiased when downsampling, rounded to uint8
        x = torch.nn.functional.interpolate(x, size=(r, r), mode="bilinear", align_corners=False,
                                            antialias=r < x.shape[-1]).round().clamp(0, 255)
    if p["num_channels"] == 3:
        x = x.repeat(1, 3, 1, 1)
    return x / 127.5 - 1.0, f"fashion_mnist test split ({path}), {r}x{r}"


def read_idx_images(path):
    """uint8 `(N, H, W)` from a gzipped IDX image file (magic 0x00000803, big-endian sizes)."""
    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    if int.from_bytes(data[:4], "big") != 0x803:
        raise RuntimeError(f"{path} is not an IDX image file")
    n, h, w = (int.from_bytes(data[4 * k:4 * k + 4], "big") for k in (1, 2, 3))
    if len(data) != 16 + n * h * w:
        raise RuntimeError(f"{path} is truncated: {len(data)} bytes for {n}x{h}x{w}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w).copy()


def machine_description(threads_per_job=None):
    """The machine, and the torch threads of each training run (``threads_per_job``, else this process's)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = threads_per_job or torch.get_num_threads()
    return (f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, {threads} thread(s) per training run")


def cpu_model():
    """The CPU's model name (Linux ``/proc/cpuinfo``, else ``platform.processor()``, else "unknown CPU"): seconds
    per step are comparable only between runs on one CPU model."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---- CLI ---------------------------------------------------------------------------------------------------


def parse_method_seeds(items):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--method_seeds {item!r}: expected METHOD=SEED,SEED,...")
        m, seeds = item.split("=", 1)
        if m not in METHODS:
            raise UsageError(f"--method_seeds {item!r}: unknown method {m!r}")
        try:
            out[m] = [int(s) for s in seeds.split(",") if s]
        except ValueError:
            raise UsageError(f"--method_seeds {item!r}: seeds must be integers") from None
    return out


# The command-line flag of each protocol key it overrides (range errors from protocols.check_protocol name it).
FLAG_OF_KEY = {"steps": "steps", "batch_size": "batch_size", "validation_steps": "validation_steps",
               "num_validation_triples": "num_validation_triples", "checkpointing_steps": "checkpointing_steps",
               "stage1.meta_steps": "meta_steps", "fd.num_generated": "fd_generated", "fd.num_real": "fd_real",
               "fd.num_inference_steps": "fd_inference_steps"}


def _check_overrides(a, base):
    """UsageError naming the flag for overrides that no protocol check can attribute to a flag (duplicates,
    negative seeds, FD flags on a protocol without FD); ranges are checked by ``protocols.check_protocol``."""
    for flag in ("methods", "seeds"):
        v = getattr(a, flag) or []
        dup = sorted({x for x in v if v.count(x) > 1}, key=str)
        if dup:
            raise UsageError(f"--{flag} lists {', '.join(map(str, dup))} more than once")
    if any(s < 0 for s in a.seeds or []):
        raise UsageError(f"--seeds must be >= 0, got {a.seeds}")
    fd_flags = [f"--{k}" for k in ("fd_generated", "fd_real", "fd_inference_steps") if getattr(a, k) is not None]
    if fd_flags and (a.no_fd or not base.get("fd")):
        raise UsageError(f"{', '.join(fd_flags)}: protocol {a.protocol!r} computes no FD"
                         + (" (--no_fd)" if a.no_fd else ""))


def check_seed_selection(p, explicit_methods=(), explicit_method_seeds=()):
    """UsageError when a requested method would run at no seed, or --method_seeds names seeds outside the
    protocol's seeds; returns notes (str) on methods the protocol's own method_seeds leave without a seed."""
    notes = []
    seeds = set(p["seeds"])
    for m in explicit_method_seeds:
        outside = [s for s in p["method_seeds"][m] if s not in seeds]
        if outside:
            raise UsageError(f"--method_seeds {m}=...: seed(s) {', '.join(map(str, outside))} not among the seeds "
                             f"{sorted(seeds)}; add them to --seeds")
        if not p["method_seeds"][m]:
            raise UsageError(f"--method_seeds {m}= names no seed")
    for m in p["methods"]:
        if not seeds_for(p, m):
            msg = (f"method {m!r} runs at no seed: its seeds {p['method_seeds'][m]} are not among {sorted(seeds)}")
            if m in explicit_methods:
                raise UsageError(msg + f"; pass --method_seeds {m}=" + ",".join(map(str, sorted(seeds))))
            notes.append(msg + " (skipped)")
    return notes


def build_protocol(a):
    """The protocol named by ``a.protocol`` with the command line's overrides.

    Raises:
        UsageError: an override that is out of range, listed twice, meaningless for the protocol, or that leaves
            an explicitly requested method without a seed (names the flag and the value)."""
    base = PROTOCOLS[a.protocol]
    _check_overrides(a, base)
    o = {}
    if a.methods:
        o["methods"] = a.methods
    if a.seeds is not None:
        o["seeds"] = a.seeds
    explicit_ms = parse_method_seeds(a.method_seeds)
    if explicit_ms:
        o["method_seeds"] = {**base.get("method_seeds", {}), **explicit_ms}
    for key in ("steps", "batch_size", "validation_steps", "num_validation_triples", "checkpointing_steps"):
        if getattr(a, key) is not None:
            o[key] = getattr(a, key)
    if a.meta_steps is not None:
        o["stage1"] = {**base["stage1"], "meta_steps": a.meta_steps}
    if a.no_fd:
        o["fd"] = None
        o["fd_note"] = "FD disabled on the command line (--no_fd)."
    elif base.get("fd"):
        given = {k: v for k, v in (("num_generated", a.fd_generated), ("num_real", a.fd_real),
                                   ("num_inference_steps", a.fd_inference_steps)) if v is not None}
        if given:
            o["fd"] = {**base["fd"], **given}
    try:
        p = get_protocol(a.protocol, o)
    except ProtocolError as e:
        flag = FLAG_OF_KEY.get(e.key)
        if flag is not None and getattr(a, flag) is not None:
            raise UsageError(f"--{flag} must be >= 1, got {e.value}") from None
        raise UsageError(str(e)) from None
    p_notes = check_seed_selection(p, a.methods or (), explicit_ms)
    for n in p_notes:
        print(f"note: {n}", file=sys.stderr)
    return p


def default_runs_dir(results_dir, protocol):
    """``benchmarks/runs/<protocol>`` for the default results folder, else ``<results_dir>.runs``: a results
    folder elsewhere never shares (and so never reuses) another folder's training runs."""
    if os.path.abspath(results_dir) == os.path.join(HERE, "results", protocol):
        return os.path.join(HERE, "runs", protocol)
    return os.path.abspath(results_dir).rstrip(os.sep) + ".runs"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", required=True, choices=list(PROTOCOLS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS),
                    help="Methods to run (default: the protocol's). Pair a method with uniform at the same seeds: "
                         "the tables compare each method with uniform on the seeds both have run.")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="Seeds to run (default: the protocol's). A method with its own seeds in the protocol "
                         "(the oracle) runs at those of them that are listed here; see --method_seeds.")
    ap.add_argument("--method_seeds", nargs="+", metavar="METHOD=S1,S2",
                    help="Seeds of one method, a subset of --seeds, e.g. --seeds 0 1 2 3 --method_seeds oracle=0,1,2,3.")
    ap.add_argument("--jobs", type=int, default=1,
                    help="Training runs at once (e.g. 2 on 2 CPU cores); each gets --threads_per_job threads.")
    ap.add_argument("--threads_per_job", type=int, default=None,
                    help="OMP/MKL threads per run (default: CPU cores / --jobs when --jobs > 1, else unchanged).")
    ap.add_argument("--max_hours", type=float, default=None,
                    help="Stop cleanly before this many hours (a job that would not fit is not started).")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--validation_steps", type=int)
    ap.add_argument("--num_validation_triples", type=int)
    ap.add_argument("--checkpointing_steps", type=int)
    ap.add_argument("--meta_steps", type=int)
    ap.add_argument("--fd_generated", type=int)
    ap.add_argument("--fd_real", type=int)
    ap.add_argument("--fd_inference_steps", type=int)
    ap.add_argument("--no_fd", action="store_true")
    ap.add_argument("--results_dir", help="Default benchmarks/results/<protocol>.")
    ap.add_argument("--runs_dir", help="Checkpoints and logs. Default: benchmarks/runs/<protocol> for the default "
                                       "--results_dir, else <results_dir>.runs next to it.")
    ap.add_argument("--raters_dir", default=os.path.join(HERE, "runs", "raters"), help="Stage-1 rater cache.")
    ap.add_argument("--dry_run", action="store_true", help="Print the resolved protocol and the pending jobs.")
    a = ap.parse_args(argv)
    try:
        if a.max_hours is not None and a.max_hours <= 0:
            raise UsageError(f"--max_hours must be > 0, got {a.max_hours}")
        p = build_protocol(a)
        results_dir = os.path.abspath(a.results_dir or os.path.join(HERE, "results", a.protocol))
        runs_dir = os.path.abspath(a.runs_dir or default_runs_dir(results_dir, a.protocol))
        deadline = time.time() + 3600 * a.max_hours if a.max_hours else None
        threads = a.threads_per_job
        if threads is None and a.jobs > 1:
            threads = max(1, (os.cpu_count() or 1) // a.jobs)
        bench = Benchmark(p, results_dir, runs_dir, os.path.abspath(a.raters_dir), deadline=deadline,
                          jobs=a.jobs, threads_per_job=threads,
                          command_line="python benchmarks/run_benchmark.py " + " ".join(
                              sys.argv[1:] if argv is None else argv))
        if a.dry_run:
            bench.check_results_dir()
            scopes = sorted({METHODS[m]["rater_scope"] for _, m in bench.pending() if METHODS[m]["rater_scope"]})
            cached = [s for s in scopes if os.path.exists(os.path.join(bench.rater_dir(s), "meta_summary.json"))]
            print(json.dumps({"protocol": p, "results_dir": results_dir, "runs_dir": runs_dir,
                              "pending": bench.pending(), "num_pending": len(bench.pending()),
                              "stage1_to_train": [s for s in scopes if s not in cached],
                              "stage1_cached": {s: bench.rater_dir(s) for s in cached}}, indent=2))
            return 0
        left = bench.run()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a training run failed or left unusable outputs: the message names the log / file
        print(f"error: {e}", file=sys.stderr)
        return 1
    if left:
        print(f"{len(left)} runs pending; run the same command again to continue.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
