from digin_cli.cli import main

main()
