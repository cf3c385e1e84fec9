"""``fastddim eval``: the sample-quality metric, and the DDIM paper's Tables 1 and 2 (``fastddim.paper``)."""
from __future__ import annotations

import os
import sys

from ..plan import SOLVERS, SPACINGS
from . import common as c


def add(sub) -> None:
    from ..paper import DEFAULT_OUT, TABLE1_ETAS, TABLE1_STEPS, TABLE2_STEPS
    from ..paper.tables import eta_str

    p = sub.add_parser(
        "eval", help="metrics and the DDIM paper's Tables 1 and 2 on the MNIST model (fastddim.paper)",
        formatter_class=c.FMT,
        description="Measure sample quality (FD in an MNIST classifier's features, not Inception FID) for one "
                    "setting, or remake the paper's Tables 1 and 2 and figures as a report.",
        epilog="examples:\n"
               "  fastddim eval -n 256 --steps 10 --eta 0                    # the metric for one setting\n"
               "  fastddim eval -n 500 --seeds 2 --steps 10 --solver dpm++2m # DPM-Solver++(2M), one setting\n"
               "  fastddim eval --table1 -n 512 --seeds 2 --out runs/t1      # the long part alone (Table 1)\n"
               "  fastddim eval --table2 --figures --table1-from runs/t1/paper_tables.json --out report/\n"
               "  fastddim eval --table2-from runs/t2/paper_tables.json --out runs/t2   # continue Table 2\n"
               f"  fastddim eval --table1 --table2 --figures                  # everything, into ./{DEFAULT_OUT}/\n\n"
               "A report is OUT/paper_tables.md, rendered from OUT/paper_tables.json (every number, rewritten\n"
               "after each cell), plus the PNGs with --figures. See docs/cli.md and docs/paper_tables.md.",
    )
    g = p.add_argument_group("what to make (default: the metric for one setting)")
    g.add_argument("--table1", action="store_true", help="FD for S x eta (paper Table 1), mean ± std over seeds")
    g.add_argument("--table2", action="store_true", help="reconstruction MSE of held-out digits (paper Table 2)")
    g.add_argument("--figures", action="store_true", help="consistency, interpolation, reconstruction and table plots (PNG)")
    p.add_argument("--model", default="mnist", help="packaged name, checkpoint path or module:attr (default mnist)")
    p.add_argument("-n", "--n", type=c.positive_int, default=128,
                   help="samples per Table 1 cell / for the single setting (default 128)")
    p.add_argument("--seeds", default="1", help="number of seeds k (0..k-1) or a comma list (default 1)")
    p.add_argument("--steps", "-S", type=c.positive_int, default=None, help="S for the single setting (default 50)")
    p.add_argument("--eta", type=c.eta_type, default=None,
                   help="eta for the single setting: a number >= 0 or sigma_hat (default 0)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="timestep spacing for Table 1 / the single setting (default quad; linspace with "
                        "--solver dpm++2m)")
    p.add_argument("--solver", choices=SOLVERS, default="ddim",
                   help="the single setting's sampler: ddim (default) or dpm++2m (DPM-Solver++(2M), eta 0). "
                        "Not with --table1/--table2/--figures: they are the DDIM paper's (Table 1 runs S x eta)")
    p.add_argument("--table1-steps", default=",".join(map(str, TABLE1_STEPS)), help="(default %(default)s)")
    p.add_argument("--table1-etas", default=",".join(eta_str(e) for e in TABLE1_ETAS), help="(default %(default)s)")
    p.add_argument("--table2-steps", default=",".join(map(str, TABLE2_STEPS)), help="(default %(default)s)")
    p.add_argument("--table2-n", type=c.positive_int, default=64,
                   help="held-out digits per Table 2 row below --table2-long-from (default 64)")
    p.add_argument("--table2-n-long", type=c.positive_int, default=16, help="held-out digits for the long rows (default 16)")
    p.add_argument("--table2-long-from", type=c.positive_int, default=200, help="S from which a row is long (default 200)")
    p.add_argument("--table2-variants", default="",
                   help="diagnostic Table 2 rows for other spacing:convention pairs, e.g. quad:source,uniform:target")
    p.add_argument("--table2-variant-steps", default="10,20,50", help="S for the diagnostic rows (default %(default)s)")
    p.add_argument("--table2-refine", type=c.nonneg_int, default=1, metavar="K",
                   help="also round-trip every Table 2 row through invert(refine=K); 0 to skip (default 1)")
    p.add_argument("--table1-from", default=None, metavar="JSON",
                   help="take Table 1 from the paper_tables.json of an earlier run of the same model; an "
                        "unfinished one (interrupted, or spread over sessions) is continued in its own settings")
    p.add_argument("--table2-from", default=None, metavar="JSON",
                   help="the same for Table 2: an unfinished one is continued row by row in its own settings")
    p.add_argument("--out", "-o", default=DEFAULT_OUT,
                   help=f"folder for paper_tables.md, paper_tables.json and the PNGs, made if missing "
                        f"(default ./{DEFAULT_OUT})")
    c.add_device(p)
    p.add_argument("--batch-size", "-b", type=c.positive_int, default=128, help="samples per model call (default 128)")
    c.add_threads(p)
    p.add_argument("--json", action="store_true", help="print the single setting's result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import shlex

    import torch

    from ..paper import evaluate, single_summary

    cmd = None  # the report prints the command line when run as `fastddim`; from Python it writes its own
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("fastddim", "__main__.py"):
        cmd = "fastddim " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        cmd += f"   (torch threads: {torch.get_num_threads()})" if args.threads is None else ""  # set by main
    res = evaluate(
        args.model, table1=args.table1, table2=args.table2, figures=args.figures, n=args.n, seeds=args.seeds,
        steps=args.steps, eta=args.eta, spacing=args.spacing, out=args.out, device=args.device,
        batch_size=args.batch_size, table1_steps=args.table1_steps, table1_etas=args.table1_etas,
        table2_steps=args.table2_steps, table2_n=args.table2_n, table2_n_long=args.table2_n_long,
        table2_long_from=args.table2_long_from, table2_variants=args.table2_variants,
        table2_variant_steps=args.table2_variant_steps, table2_refine=args.table2_refine,
        table1_from=args.table1_from, table2_from=args.table2_from, command=cmd, solver=args.solver,
    )
    if res.get("single") is None:
        print(res["report"])
    else:
        print(json.dumps(res["single"]) if args.json else single_summary(res["single"]))
    return 0
