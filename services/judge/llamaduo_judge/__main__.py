from llamaduo_judge.app import main

main()
