from llamaduo_trainer.app import main

main()
