from llamaduo.cli import main

main()
