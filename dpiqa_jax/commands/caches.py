"""`dpiqa-jax caches`: the caches that runs left on disk (what each holds, its size, its last use),
and the removal of those that no run has used for some days."""
import datetime
import os
import sys

from dpiqa_jax.commands import positive


def register(sub):
    p = sub.add_parser("caches", help="list the caches under folders; remove those unused for some days")
    p.add_argument("folders", nargs="*", metavar="FOLDER",
                   help="a cache_dir, a workdir, a folder of runs, a compilation cache (default: the "
                        "compilation cache, which also holds the stored train steps)")
    p.add_argument("--unused-for", type=positive(float, "a positive number of days"), metavar="DAYS",
                   help="remove the entries that no run has used for DAYS days")
    p.set_defaults(run=run)


def run(args):
    import jax

    from dpiqa_jax import cache_files
    from dpiqa_jax.errors import UserError
    from dpiqa_jax.train.example_cache import human_size

    for folder in args.folders:
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: no such folder")
    folders = args.folders or [jax.config.jax_compilation_cache_dir]  # nothing there before a first run
    entries = sorted({entry for folder in folders for entry in cache_files.find(os.path.abspath(folder))},
                     key=lambda entry: entry.last_used)
    if not args.unused_for:
        for entry in entries:
            used = datetime.datetime.fromtimestamp(entry.last_used).strftime("%Y-%m-%d %H:%M")
            print(f"{used}  {human_size(entry.size):>10}  {entry.path}  {entry.what}")
        print(f"{len(entries)} entries, {human_size(sum(entry.size for entry in entries))}")
        return 0
    removed, failed = [], 0
    for entry in cache_files.stale(entries, args.unused_for):
        try:
            cache_files.remove(entry)
        except OSError as error:
            print(f"dpiqa-jax caches: cannot remove {entry.path}: {error.strerror}", file=sys.stderr)
            failed += 1
            continue
        removed.append(entry)
        print(f"removed {entry.path} ({human_size(entry.size)}, {entry.what})")
    kept = [entry for entry in entries if entry not in removed]
    print(f"removed {len(removed)} entries ({human_size(sum(e.size for e in removed))}); kept {len(kept)} "
          f"({human_size(sum(e.size for e in kept))})")
    return 1 if failed else 0
