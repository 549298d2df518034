from returner.cli import main

main()
