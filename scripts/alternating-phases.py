#!/usr/bin/env python3
"""Compare servers in alternating call phases, with each server's CPU per call.

    scripts/alternating-phases.py [--callers N] [--seconds S] [--rounds R] NAME=KIND[@BINARY][:VAR=VALUE,...] ...

KIND is `native` (`warren bench --serve-native`) or `warren` (`warren serve` with the echo
plugin, concurrency 16, prefetch 64, no module cache). BINARY defaults to
./target/release/warren, so two builds can be set against each other; VAR=VALUE pairs go into
that server's environment, for experiments switched by a variable; ECHO_MODULE=PATH among them
serves another echo module (plugins/out/echo.wasm by default). The load generator is always
./target/release/warren, the same for every server. Examples:

    scripts/alternating-phases.py native=native warren=warren old=warren@/tmp/warren-old
    scripts/alternating-phases.py native=native warren=warren big=warren:ECHO_MODULE=/tmp/echo.wasm

Every server starts at once on its own fresh topic and stays up; each round gives every server
one phase of `warren bench --topic` in turn, the order reversed every other round, so slow
drifts of a shared or virtual machine fall on all of them alike. The server's CPU per call is
its process's user and system time over the phase (all threads, from /proc) divided by the
calls the phase counted. It prints each round's rates, then per server the median rate, p50
and CPU per call, and the ratio to the first server (of the medians, and the median of the
per-round ratios). docs/bench-history.md calls this alternating phases (runs T to X).

Needs a release build (`cargo build --release -p warren`) and the plugins (`make
example-plugins`); the broker from $WARREN_BROKER or the local default. The servers' queues are
deleted at the end (with rabbitmqctl, when it is on the PATH).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARREN = ROOT / "target" / "release" / "warren"
ECHO = ROOT / "plugins" / "out" / "echo.wasm"
BROKER = os.environ.get("WARREN_BROKER", "amqp://guest:guest@127.0.0.1:5672/%2f")


class Server:
    def __init__(self, spec, tag, workdir):
        self.name, _, rest = spec.partition("=")
        kind_binary, _, env_spec = rest.partition(":")
        self.kind, _, binary = kind_binary.partition("@")
        if not self.name or self.kind not in ("native", "warren"):
            sys.exit(f"bad server {spec!r}: want NAME=native|warren[@BINARY][:VAR=VALUE,...]")
        self.binary = binary or str(WARREN)
        self.topic = f"alt_{tag}_{self.name}"
        self.rates, self.p50s, self.cpus = [], [], []
        env = dict(os.environ)
        for pair in filter(None, env_spec.split(",")):
            key, _, value = pair.partition("=")
            env[key] = value
        module = env.get("ECHO_MODULE", str(ECHO))
        if self.kind == "native":
            argv = [self.binary, "bench", "--serve-native", "--topic", self.topic,
                    "--exchange", "openstack", "--broker", BROKER]
            ready = "READY"
        else:
            config = workdir / f"{self.name}.toml"
            config.write_text(
                f'[broker]\nurl = "{BROKER}"\n'
                "[server]\nprefetch = 64\nconcurrency = 16\nwatch = false\ncache_dir = \"\"\n"
                f'[[handler]]\ntopic = "{self.topic}"\nmodule = "{module}"\n'
            )
            env["WARREN_LOG_FORMAT"] = "json"
            argv = [self.binary, "serve", "--config", str(config)]
            ready = '"message":"ready"'
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, text=True)
        for line in self.process.stdout:
            if ready in line:
                break
        else:
            # main's cleanup deletes the queues it may have declared.
            self.stop()
            sys.exit(f"{self.name} exited before it was ready")
        # Keep draining its output so that it never blocks on a full pipe.
        self.drain = subprocess.Popen(["cat"], stdin=self.process.stdout, stdout=subprocess.DEVNULL)

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def phase(self, callers, seconds):
        before = self.cpu_seconds()
        out = subprocess.run(
            [str(WARREN), "bench", "--topic", self.topic, "--callers", str(callers),
             "--duration", str(seconds), "--casts", "0", "--json", "--broker", BROKER],
            capture_output=True, text=True, check=True)
        calls = json.loads(out.stdout)["servers"][0]["calls"][0]
        self.cpus.append((self.cpu_seconds() - before) * 1e6 / max(calls["calls"], 1))
        self.rates.append(calls["rate"])
        self.p50s.append(calls["p50_ms"])
        if calls.get("errors"):
            print(f"{self.name}: {calls['errors']} calls failed", flush=True)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def delete_queues(prefix):
    """Delete the queues the servers declared (the topic, `topic.host`, the fanout queue)."""
    if not shutil.which("rabbitmqctl"):
        return
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"],
                            capture_output=True, text=True)
    for name in listed.stdout.split():
        if name.startswith(prefix):
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", name], capture_output=True)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("servers", nargs="+", metavar="NAME=KIND[@BINARY][:VAR=VALUE,...]")
    args = parser.parse_args()
    if not WARREN.exists() or not ECHO.exists():
        sys.exit("needs cargo build --release -p warren and make example-plugins")
    tag = uuid.uuid4().hex[:6]
    servers = []
    with tempfile.TemporaryDirectory() as workdir:
        try:
            for spec in args.servers:
                servers.append(Server(spec, tag, Path(workdir)))
            for round_ in range(args.rounds):
                for server in servers if round_ % 2 == 0 else servers[::-1]:
                    server.phase(args.callers, args.seconds)
                print(f"round {round_ + 1}: "
                      + "  ".join(f"{s.name}={s.rates[-1]:.0f}/s" for s in servers), flush=True)
        finally:
            for server in servers:
                server.stop()
            delete_queues(f"alt_{tag}_")
    base = servers[0]
    print(f"\n{args.callers} callers, {args.rounds} rounds of {args.seconds} s phases")
    for server in servers:
        median = statistics.median(server.rates)
        paired = statistics.median(a / b for a, b in zip(server.rates, base.rates))
        print(f"{server.name:>12}: {median:7.0f} calls/s (median), p50 "
              f"{statistics.median(server.p50s):.3f} ms, server CPU "
              f"{statistics.median(server.cpus):6.1f} us/call; vs {base.name} "
              f"{median / statistics.median(base.rates):.3f}x (medians), {paired:.3f}x (paired)")


if __name__ == "__main__":
    main()
