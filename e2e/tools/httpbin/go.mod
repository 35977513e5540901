// Wrapper module: builds go-httpbin from the Go module proxy (the gateway tests' plain HTTP
// upstream).
module keybroker.dev/e2e/tools/httpbin

go 1.26.0

tool github.com/mccutchen/go-httpbin/v2/cmd/go-httpbin

require github.com/mccutchen/go-httpbin/v2 v2.26.0 // indirect
