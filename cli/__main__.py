from actwh.cli import main

main()
