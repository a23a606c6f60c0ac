"""`push` and `download`: moving encoders to and from the Hugging Face Hub."""

from __future__ import annotations

import argparse

from . import options


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "push", help="upload a saved encoder to the Hub with a model card, in one commit",
        examples=["runs/s3/final me/flux-t5-small-distilled --private",
                  "runs/s3/final me/flux-t5-small-distilled --create-pr --commit-message 'Stage 3 weights'"],
        run=run_push,
    )
    parser.add_argument("folder", help="a folder written by save_pretrained (e.g. a trainer's output_dir/final)")
    parser.add_argument("repo_id", help="the Hub repository, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    options.add_revision(parser, help="branch to commit to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message")
    parser.add_argument("--tokenizer", help="a tokenizer folder or repo id to upload with the model")
    parser.add_argument("--license", help="Hub license id of the weights (default: other)")
    parser.add_argument("--pipeline", help="the pipeline it was distilled for (default: the training config's)")
    parser.add_argument("--teacher", help="the encoder it replaces (default: the training config's)")
    parser.add_argument("--base-model", help="Hub id of the T5 it started from (default: from its config)")
    options.add_token(parser, purpose="with write access")

    parser = options.add_command(
        subparsers, "download", help="fetch an encoder's files into the Hugging Face cache and print its folder",
        examples=["t5-base-distilled", "me/flux-t5-small-distilled --revision v1 --token hf_..."],
        run=run_download,
    )
    parser.add_argument("encoder", help="registry name or Hub repo id (a local folder or file is printed as it is)")
    options.add_revision(parser)
    parser.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--local-files-only", action="store_true", help="use the cache only, never the network")
    options.add_token(parser)


def run_push(args: argparse.Namespace) -> None:
    from ..hub import push_to_hub

    commit = push_to_hub(
        args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
        create_pr=args.create_pr, commit_message=args.commit_message, tokenizer=args.tokenizer,
        license=args.license, pipeline=args.pipeline, teacher=args.teacher, base_model=args.base_model,
    )
    print(f"uploaded {args.folder} to {args.repo_id}: {commit.pr_url or commit.commit_url}")


def run_download(args: argparse.Namespace) -> None:
    from ..hub import download

    print(download(
        args.encoder, revision=args.revision, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
        token=args.token,
    ))
