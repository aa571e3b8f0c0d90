from llamaduo_inferencer.app import main

main()
