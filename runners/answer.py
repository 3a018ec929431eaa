"""Answer one request with a trained controller: the answer, the chosen knobs, the latency by phase.

    python runners/answer.py --run RUN_DIR --image PATH --question TEXT --budget_ms B [--json]
        [--reference ANSWER] [--device cpu|cuda] [--warmup N]

RUN_DIR is a training --output_dir (its best checkpoint, else its latest) or a checkpoint file;
the backend is rebuilt from the config stored in the checkpoint. From Python:
agents.answer.answer_request(run, image, question, budget_ms).
"""
from __future__ import annotations

import argparse
import json

from agents.answer import answer_request
from agents.cli import user_input


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training output_dir, or a checkpoint file")
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--question", required=True, help="the question about the image")
    p.add_argument("--budget_ms", type=float, required=True, help="latency budget of this request in ms")
    p.add_argument("--reference", help="a reference answer: also print the VQA accuracy against it")
    p.add_argument("--device", help="cpu or cuda (default: the run's)")
    p.add_argument("--warmup", type=int, default=1, help="identical requests run before the measured one (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with user_input():
        out = answer_request(args.run, args.image, args.question, args.budget_ms, reference=args.reference,
                             device=args.device, warmup=args.warmup)
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    k = out["knobs"]
    print(f"answer: {out['answer']}")
    if out["accuracy"] is not None:
        print(f"accuracy: {out['accuracy']:.2f} (against --reference)")
    print(f"knobs: tier {k['tier']}, insertion {k['insertion']}, top-k {k['top_k']}, blocks {k['num_blocks']}")
    verdict = "over budget" if out["violation"] else "within budget"
    extrapolated = "" if out["budget_in_trained_range"] else " (outside the trained budget range)"
    print(f"latency: {out['latency_ms']:.2f} ms, {verdict} {out['budget_ms']:g} ms{extrapolated}")
    print("  " + ", ".join(f"{phase} {ms:.2f}" for phase, ms in out["latency_by_phase_ms"].items()))
    return out


if __name__ == "__main__":
    main()
