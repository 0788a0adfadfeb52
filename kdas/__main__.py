from kdas.cli import main

main()
