from momoe.cli import main

main()
