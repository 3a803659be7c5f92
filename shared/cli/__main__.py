from boxrefine.shared.cli.main import main

main()
