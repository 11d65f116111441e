//go:build tools

// Package tools names the command this module builds.
package tools

import _ "github.com/coredns/coredns"
