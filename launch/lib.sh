# Helpers shared by the launch scripts (sourced, not run). Needs PROG set by the caller.

die() { echo "$PROG: error: $*" >&2; exit 2; }

# Quote one word for a POSIX shell, leaving simple words bare (readable dry runs).
# "--flag=value" prints as --flag='value' and "VAR=value" as VAR='value'.
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--?[A-Za-z0-9_.-]+=|[A-Za-z_][A-Za-z0-9_]*=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"; sq "${BASH_REMATCH[2]}"
  else
    sq "$1"
  fi
}
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
qall() { local out="" w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }

# Option values: "--opt value" or "--opt=value" (the caller's loop sets has_val / val / SHIFT).
need_value() { [[ $# -ge 2 ]] || die "option $1 needs a value"; }
take() { if (( has_val )); then SHIFT=1; else need_value "$@"; val="$2"; SHIFT=2; fi; }
