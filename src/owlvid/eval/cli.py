"""`owlvid eval BENCHMARK ...` and `owlvid eval compare OUTDIR...` (registered by owlvid.cli)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .image_scoring import IMAGE_BENCHMARKS
from .protocols import BENCHMARKS, PROTOCOLS


def add_parser(sub: Any, parents: list[argparse.ArgumentParser], load_model: Callable[[argparse.Namespace], Any],
               debug: argparse.ArgumentParser, positive_int: Callable[[str], int],
               ray: tuple[argparse.ArgumentParser, Callable[[argparse.Namespace, dict], dict | None]] | None = None
               ) -> None:
    """The `eval` command under `sub` (the owlvid subparsers); `parents` carry the model options; `load_model`
    and `positive_int` are owlvid.cli's model loader and argument type; `ray`: the video benchmarks' Ray options
    and the function that runs on Ray with them (returning None without --ray), from owlvid.cli (eval sits
    below Ray)."""
    ray_parents, on_ray = ([ray[0]], ray[1]) if ray else ([], None)
    p = sub.add_parser("eval", parents=[debug], help="evaluate on a video benchmark under its published protocol",
                       description="Evaluate a model on MVBench, NExT-QA (MC), Video-MME, LongVideoBench or MLVU "
                       "read from the dataset folder as downloaded, under the official mPLUG-Owl3 protocol, "
                       "lmms-eval's, or the Slow-Fast authors'; on the model card's image tables (multi-image, "
                       "VQA, general) under the official protocol or lmms-eval's; or compare finished runs.")
    benchmarks = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=type(p))
    benchmarks.required = True
    for name in BENCHMARKS:
        b = benchmarks.add_parser(name, parents=[*parents, *ray_parents, debug], help=f"run {name}",
                                  description=f"Run {name}; OUTDIR gets predictions.jsonl (one line per question, "
                                  "written as answered), results.json and run.json. Rerunning the same command "
                                  "continues an interrupted run. With --ray, the questions are spread over model "
                                  "replicas on a Ray cluster (one per GPU by default), with the same results.")
        b.add_argument("--data", required=True, metavar="DIR", help="the dataset folder, as downloaded")
        b.add_argument("--protocol", choices=PROTOCOLS, default=None,
                       help="official (mPLUG-Owl3 evaluation code), lmms_eval, or slowfast (the Slow-Fast authors' "
                       "settings); default: official for mPLUG-Owl3 (lmms_eval for mlvu), slowfast for Slow-Fast")
        b.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
        b.add_argument("--limit", type=positive_int, default=None, metavar="N",
                       help="only the first N questions (after --tasks), for a quick look")
        b.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                       help="only these tasks (MVBench/MLVU task, NExT-QA type, Video-MME duration, "
                       "LongVideoBench question category)")
        b.add_argument("--num-frames", type=positive_int, default=None, metavar="N",
                       help="frames per video instead of the protocol's (default: the protocol's; Slow-Fast: the "
                       "checkpoint's training frame count, as its authors evaluated)")
        b.add_argument("--max-batch", type=positive_int, default=8, help="questions decoded together (default: 8)")
        b.add_argument("--seed", type=int, default=0,
                       help="seeds the official random frame draw of bounded MVBench questions and lmms-eval's "
                       "random fallback answers (default: 0)")
        b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
        b.set_defaults(func=lambda args: cmd_eval(args, load_model, on_ray))
    for name in IMAGE_BENCHMARKS:
        _add_image_parser(benchmarks, name, [*parents, *ray_parents], debug, positive_int, load_model, on_ray)
    c = benchmarks.add_parser("compare", parents=[debug], help="compare finished runs",
                              description="Print runs side by side with the published numbers of their checkpoints.")
    c.add_argument("outdirs", nargs="+", metavar="OUTDIR")
    c.set_defaults(func=cmd_compare)


def _add_image_parser(benchmarks: Any, name: str, parents: list[argparse.ArgumentParser],
                      debug: argparse.ArgumentParser, positive_int: Callable[[str], int],
                      load_model: Callable[[argparse.Namespace], Any],
                      on_ray: Callable[[argparse.Namespace, dict], dict | None] | None) -> None:
    """An image-table benchmark (mPLUG-Owl3 model card: multi-image, VQA, general)."""
    b = benchmarks.add_parser(name, parents=[*parents, debug], help=f"run {name} (image table)",
                              description=f"Run {name}; OUTDIR gets predictions.jsonl (images and cut grid per "
                              "question), results.json, run.json, and the submission file of a split scored by a "
                              "server or a judge. Rerunning the same command continues an interrupted run. With --ray, "
                              "the questions are spread over model replicas on a Ray cluster.")
    b.add_argument("--data", required=True, metavar="DIR",
                   help="the HF dataset folder as downloaded, or the official evaluation folder (with dataset/)")
    b.add_argument("--protocol", choices=("official", "lmms_eval"), default=None,
                   help="official (mPLUG-Owl3 evaluation code, default) or lmms_eval")
    b.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    b.add_argument("--split", default=None, help="the parquet split (default: the model card's)")
    b.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N questions")
    b.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="only these categories (POPE split, sub-task, MMBench category ...)")
    b.add_argument("--max-batch", type=positive_int, default=8, help="questions decoded together (default: 8)")
    b.add_argument("--seed", type=int, default=0, help="seeds lmms-eval's random fallbacks (default: 0)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.set_defaults(func=lambda args: cmd_eval_images(args, load_model, on_ray))


def cmd_eval_images(args: argparse.Namespace, load_model: Callable[[argparse.Namespace], Any],
                    on_ray: Callable[[argparse.Namespace, dict], dict | None] | None = None) -> int:
    from .image_results import format_image_table
    from .image_runner import run_images

    options = {"protocol": args.protocol, "limit": args.limit, "tasks": args.tasks, "split": args.split,
               "max_batch": args.max_batch, "seed": args.seed, "progress": not args.no_progress}
    return _run_and_print(args, options, run_images, format_image_table, load_model, on_ray)


def cmd_eval(args: argparse.Namespace, load_model: Callable[[argparse.Namespace], Any],
             on_ray: Callable[[argparse.Namespace, dict], dict | None] | None = None) -> int:
    from .results import format_table
    from .runner import run

    options = {"protocol": args.protocol, "limit": args.limit, "tasks": args.tasks, "num_frames": args.num_frames,
               "max_batch": args.max_batch, "seed": args.seed, "progress": not args.no_progress}
    return _run_and_print(args, options, run, format_table, load_model, on_ray)


def _run_and_print(args: argparse.Namespace, options: dict, runner: Callable[..., dict],
                   formatter: Callable[[dict], str], load_model: Callable[[argparse.Namespace], Any],
                   on_ray: Callable[[argparse.Namespace, dict], dict | None] | None) -> int:
    """The run on Ray replicas when `on_ray` takes it (it returns None without --ray), else in this process."""
    results = on_ray(args, options) if on_ray else None
    if results is None:
        results = runner(args.benchmark, args.data, lambda: load_model(args), args.output, **options)
    print(formatter(results))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_table

    print(compare_table(args.outdirs))
    return 0
