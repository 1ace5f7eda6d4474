"""The `lorta` command and its training jobs, built on the library (``import lorta``) and never imported by it.

    cli          the `lorta` command (``lorta = "lorta.app.cli:main"``); one module per subcommand in commands/
    train/       the jobs of `lorta train`: options, adapters, trainer, evaluation
    frontier     `lorta train --frontier`: a budget sweep against LoRA / VeRA
    data         the packaged data sets
    models       packaged and cached base models (GGUF conversion, quantised loading)
    catalogue    published model configs (``lorta params`` without a download) and model-name resolution

Its extra dependencies (tqdm, matplotlib, trl, gguf) come with ``pip install 'lorta[cli]'``.
"""
