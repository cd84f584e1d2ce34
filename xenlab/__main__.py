from xenlab.cli import main

main()
