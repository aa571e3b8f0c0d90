from llamaduo_coordinator.app import main

main()
