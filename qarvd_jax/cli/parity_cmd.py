"""``qarvd parity FIXTURE_DIR...``: the same checks as ``scripts/parity.py``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("parity", help="verify the port against golden fixture folders (DiT, VAE, umT5)")
    p.add_argument("fixture_dirs", nargs="+")
    p.set_defaults(func=run)


def run(args) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from qarvd_jax.parity import verify
    from qarvd_jax.utils.parity import format_reports

    ok = True
    for d in args.fixture_dirs:
        kind, reports = verify(d)
        print(f"== {d} ({kind}) ==")
        print(format_reports(reports))
        failed = [r.name for r in reports if not r.passed]
        print(f"{len(reports) - len(failed)}/{len(reports)} arrays within tolerance"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        ok &= not failed
    return 0 if ok else 1
