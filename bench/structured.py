"""Structured output's cost in serving: 64 concurrent JSON-schema requests vs the same 64
unconstrained, in one run of one cluster.

    python -m bench.structured --json [--prefill 1 --decode 1] [--rounds 8] [--engine]

One ``pdserve serve`` (Ray, the tiny demo model unless ``--model``) on a free port it
reports. Each round sends the 64 constrained requests at once (chat, ``response_format:
json_schema``, eight schemas in turn, temperature 1, seeded), then the same 64 prompts
unconstrained with ``min_tokens = max_tokens =`` the token count each constrained twin
produced (``ignore_eos``): both sides generate exactly the same number of tokens per
request, so the only difference is the grammar. Rounds alternate which kind goes first,
so both see the same background load; the ratio is the median over rounds. Reported per kind: output tokens/s of the whole batch (sum
of tokens / wall time from the first request sent to the last token), and TPOT per
request (time between its first and last token / (tokens - 1)), median and P90; the
constrained outputs are checked to validate against their schemas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema

logger = logging.getLogger("bench.structured")

STR = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": 0, "maximum": 9999}


def _obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}  # fmt: skip


def _list(item: dict, lo: int, hi: int) -> dict:
    return {"type": "array", "items": item, "minItems": lo, "maxItems": hi}


SCHEMAS = [
    _obj({"name": STR, "age": INT, "email": STR, "tags": _list(STR, 3, 5)}),
    _obj(
        {
            "id": INT,
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "items": _list(
                _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": INT}),
                3,
                5,
            ),
        }
    ),  # fmt: skip
    _obj({"title": STR, "year": INT, "authors": _list(_obj({"first": STR, "last": STR}), 2, 4)}),
    _obj(
        {
            "city": {"enum": ["Paris", "Rome", "Oslo", "Lima"]},
            "days": _list(
                _obj({"high": INT, "low": INT, "sky": {"enum": ["sun", "rain", "snow"]}}), 3, 6
            ),
        }
    ),  # fmt: skip
    _obj(
        {
            "a": _obj({"b": _obj({"c": STR, "d": INT}), "e": {"type": "boolean"}}),
            "f": {"type": ["string", "null"], "maxLength": 8},
            "g": _list(INT, 4, 8),
        }
    ),  # fmt: skip
    _obj({"matrix": _list(_list(INT, 3, 3), 3, 4)}),
    _obj(
        {
            "user": STR,
            "roles": _list({"enum": ["admin", "dev", "ops", "qa"]}, 2, 4),
            "active": {"type": "boolean"},
            "notes": _list(STR, 2, 4),
        }
    ),  # fmt: skip
    _obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, "lines": _list(STR, 3, 6)}),
]


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "router.launch.cli", "serve", "--port", "0", "--prefill", str(args.prefill),
           "--decode", str(args.decode), "--served-model-name", "tiny", "--max-inflight", "1024"]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        m = re.search(r"pdserve ready in .*?: (http://\S+)/v1", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {proc.returncode}; see {log}")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"pdserve serve not ready in {args.start_timeout}s; see {log}")


def bodies(n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        schema = SCHEMAS[i % len(SCHEMAS)]
        out.append({
            "model": "tiny", "stream": True, "temperature": 1.0, "seed": i, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Request {i}: fill in the record."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i % len(SCHEMAS)}", "schema": schema}},
            "return_token_ids": True,
        })  # fmt: skip
    return out


async def one(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    times, text, ids = [], "", []
    sent = time.perf_counter()
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("token_ids"):
                times.append(time.perf_counter())
                ids += choice["token_ids"]
            text += choice["delta"].get("content") or ""
    tpot = (times[-1] - times[0]) / (len(ids) - 1) if len(ids) > 1 else None
    ttft = times[0] - sent if times else None
    return {"text": text, "tokens": len(ids), "tpot": tpot, "ttft": ttft, "end": times[-1] if times else None}  # fmt: skip


async def batch(url: str, reqs: list[dict]) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(http, url, b) for b in reqs))
    wall = max(r["end"] for r in res) - t0
    tpots = sorted(r["tpot"] for r in res if r["tpot"] is not None)
    return {
        "results": res,
        "tokens": sum(r["tokens"] for r in res),
        "tok_s": sum(r["tokens"] for r in res) / wall,
        "tpot_ms_median": 1e3 * statistics.median(tpots),
        "tpot_ms_p90": 1e3 * tpots[int(0.9 * (len(tpots) - 1))],
        "ttft_ms_median": 1e3 * statistics.median(r["ttft"] for r in res if r["ttft"] is not None),
    }


def unconstrained(reqs: list[dict], constrained: dict) -> list[dict]:
    out = []
    for body, r in zip(reqs, constrained["results"], strict=True):
        free = {k: v for k, v in body.items() if k != "response_format"}
        n = max(1, r["tokens"])
        out.append({**free, "max_tokens": n, "min_tokens": n, "ignore_eos": True})
    return out


def check(reqs: list[dict], constrained: dict) -> int:
    valid = 0
    for body, r in zip(reqs, constrained["results"], strict=True):
        try:
            jsonschema.validate(json.loads(r["text"]), body["response_format"]["json_schema"]["schema"])  # fmt: skip
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return valid


def run(url: str, args: argparse.Namespace) -> dict:
    reqs = bodies(args.num_requests, args.max_tokens)
    asyncio.run(batch(url, reqs[:4]))  # warm-up: grammars compiled, paths exercised
    # Seeded draws: every round's constrained outputs are the same, so the unconstrained
    # twins' lengths come from the first, and the rounds can alternate which kind leads.
    free = unconstrained(reqs, asyncio.run(batch(url, reqs)))
    rounds = []
    for i in range(args.rounds):
        order = ("constrained", "unconstrained") if i % 2 == 0 else ("unconstrained", "constrained")
        got = {kind: asyncio.run(batch(url, reqs if kind == "constrained" else free)) for kind in order}  # fmt: skip
        c, u = got["constrained"], got["unconstrained"]
        assert u["tokens"] == c["tokens"], (u["tokens"], c["tokens"])
        rounds.append({"constrained": c, "unconstrained": u, "valid": check(reqs, c)})
        logger.info("round %d: constrained %.0f tok/s, unconstrained %.0f tok/s, %d/%d valid",
                    i + 1, c["tok_s"], u["tok_s"], rounds[-1]["valid"], len(reqs))  # fmt: skip
    return summary(rounds, args)


def summary(rounds: list[dict], args: argparse.Namespace) -> dict:
    def med(kind: str, key: str) -> float:
        return round(statistics.median(r[kind][key] for r in rounds), 2)

    return {
        "num_requests": args.num_requests,
        "rounds": args.rounds,
        "mode": "aggregated" if args.prefill == 0 else f"{args.prefill}P+{args.decode}D",
        "tokens_per_round": rounds[0]["constrained"]["tokens"],
        "valid_json": [r["valid"] for r in rounds],
        "constrained_tok_s": med("constrained", "tok_s"),
        "unconstrained_tok_s": med("unconstrained", "tok_s"),
        "throughput_ratio": round(
            statistics.median(
                r["constrained"]["tok_s"] / r["unconstrained"]["tok_s"] for r in rounds
            ),
            3,
        ),  # fmt: skip
        "per_round_ratio": [
            round(r["constrained"]["tok_s"] / r["unconstrained"]["tok_s"], 3) for r in rounds
        ],  # fmt: skip
        "constrained_tpot_ms": {
            "median": med("constrained", "tpot_ms_median"),
            "p90": med("constrained", "tpot_ms_p90"),
        },  # fmt: skip
        "unconstrained_tpot_ms": {
            "median": med("unconstrained", "tpot_ms_median"),
            "p90": med("unconstrained", "tpot_ms_p90"),
        },  # fmt: skip
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def engine_ab(args: argparse.Namespace) -> dict:
    """The same A/B in one process on the engine alone (no HTTP, no workers): what the
    grammar costs the batch itself. Alternating runs, minimum and median wall time."""
    from engine import LLM, SamplingParams
    from engine.sampling_params import StructuredOutput
    from engine.tiny_model import ensure_demo_model

    llm = LLM(args.model or ensure_demo_model())
    prompts = [[5 + i % 50, 6, 7, 8, 9, 10] for i in range(args.num_requests)]
    so = [StructuredOutput("json", json.dumps(SCHEMAS[i % len(SCHEMAS)])) for i in range(len(prompts))]  # fmt: skip
    sp = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, structured=s) for i, s in enumerate(so)]  # fmt: skip
    lens = [len(o.token_ids) for o in llm.generate(prompts, sp)]
    free = [SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=1.0, seed=i) for i, n in enumerate(lens)]  # fmt: skip
    times: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    for _ in range(2 * args.rounds + 1):
        for kind, params in (("constrained", sp), ("unconstrained", free)):
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            times[kind].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {
        "engine_tokens": sum(lens),
        "engine_ratio_best": round(best["unconstrained"] / best["constrained"], 3),
        "engine_ratio_median": round(
            statistics.median(times["unconstrained"]) / statistics.median(times["constrained"]), 3
        ),  # fmt: skip
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the tiny demo model)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0 = aggregated)")
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8, help="A/B pairs, alternating which leads")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--engine", action="store_true", help="also the in-process engine A/B")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-structured-{os.getpid()}.log"
    proc, url = start_server(args, log)
    try:
        out = run(url, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if args.engine:
        out |= engine_ab(args)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
