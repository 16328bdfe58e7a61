from actwh.cli.main import cli

cli()
