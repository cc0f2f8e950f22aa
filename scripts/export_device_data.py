"""Write one device data folder per partition (format v1, `nmoe/device_data.py`), holding exactly
the split a simulation with the same config derives, so a deployment whose SuperNodes read these
folders (node config `data-dir`) trains on the same samples.

    python scripts/export_device_data.py --dataset fashion_mnist --partition dirichlet \
        --alpha 0.3 --nodes 10 --seed 0 --out /srv/nmoe-data --with-global-test
    # then on device i: --node-config "partition-id=i num-partitions=10 data-dir='.../device-i'"

Extra Hydra overrides of the data config may follow, e.g. `dataset.local_test_fraction=0.3`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nmoe.config import DATASETS, PARTITIONS, ConfigError, compose_config
from nmoe.data import federation_spec, load_client_data, spec_dataset_info
from nmoe.device_data import write_device_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--partition", choices=PARTITIONS, default="dirichlet")
    parser.add_argument("--alpha", type=float, help="Dirichlet concentration (partition.alpha)")
    parser.add_argument("--classes-per-client", type=int, help="pathological partition")
    parser.add_argument("--nodes", type=int, required=True, help="number of partitions/devices")
    parser.add_argument("--seed", type=int, default=0, help="the run seed of the simulation")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/device-<i>/")
    parser.add_argument("--format", choices=("npz", "imagefolder"), default="npz")
    parser.add_argument("--with-global-test", action="store_true", help="add the global test set")
    parser.add_argument("--subsample", type=int, help="dataset.subsample")
    parser.add_argument("--label-fraction", type=float, help="dataset.label_fraction")
    parser.add_argument("--dataset-path", help="dataset.path (local dataset folder)")
    parser.add_argument("--force", action="store_true", help="replace existing device folders")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of the data config")
    return parser.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The Hydra overrides that give the simulation's data config."""
    out = [f"dataset={args.dataset}", f"partition={args.partition}", f"seed={args.seed}"]
    optional = {
        "partition.alpha": args.alpha,
        "partition.classes_per_client": args.classes_per_client,
        "dataset.subsample": args.subsample,
        "dataset.label_fraction": args.label_fraction,
        "dataset.path": args.dataset_path,
    }
    out += [f"{key}={value}" for key, value in optional.items() if value is not None]
    return out + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nodes < 1:
        print("--nodes must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = compose_config(overrides_of(args))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    targets = [args.out / f"device-{pid}" for pid in range(args.nodes)]
    taken = [t for t in targets if t.exists() and any(t.iterdir())]
    if taken and not args.force:
        print(f"{taken[0]} exists and is not empty (use --force to replace)", file=sys.stderr)
        return 2
    spec = federation_spec(cfg)
    info = spec_dataset_info(spec)
    clients = [load_client_data(spec, pid, args.nodes)[0] for pid in range(args.nodes)]
    for pid, (target, client) in enumerate(zip(targets, clients, strict=True)):
        if target.exists():
            shutil.rmtree(target)
        write_device_data(
            target,
            client,
            info,
            fmt=args.format,
            with_global=args.with_global_test,
            label_fraction=float(cfg.dataset.label_fraction),
            provenance={
                "exporter": "scripts/export_device_data.py",
                "partition_id": pid,
                "num_partitions": args.nodes,
                "overrides": overrides_of(args),
            },
        )
        labelled = int(client.train_labelled.sum())
        print(
            f"{target}: train {len(client.train_y)} ({labelled} labelled), "
            f"test {len(client.test_y)}"
            + (f", global {len(client.global_y)}" if args.with_global_test else "")
        )
        print(
            f'  flower-supernode ... --node-config "partition-id={pid} '
            f"num-partitions={args.nodes} data-dir='{target.resolve()}'\""
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
