from dspark_cli.cli import console

console()
