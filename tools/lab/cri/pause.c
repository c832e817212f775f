/* The lab's pod sandbox process, built static by pause_image.py: it holds the pod's
 * namespaces and does nothing else, like Kubernetes' pause. SIGINT/SIGTERM end it (0);
 * as PID 1 of its pid namespace it reaps any orphan that is handed to it. */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = stop;
    if (sigaction(SIGINT, &action, NULL) != 0 || sigaction(SIGTERM, &action, NULL) != 0)
        return 1;
    action.sa_handler = reap;
    action.sa_flags = SA_NOCLDSTOP;
    if (sigaction(SIGCHLD, &action, NULL) != 0)
        return 1;
    for (;;)
        pause();
}
